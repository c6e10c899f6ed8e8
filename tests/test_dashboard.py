"""saelab-dashboard: the data it writes (checked against an independent computation for a planted latent), the
pages in a real headless Chromium (summary, a latent, the search box), screenshots, and bad input."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saelab.dashboard.browser import Chromium, dump_dom, file_url, find_chromium, screenshot
from saelab.dashboard.cli import main
from saelab.run.compose import CONF_DIR
from tests.conftest import run_cli, tiny_overrides

pytestmark = pytest.mark.slow
os.environ.setdefault("WANDB_MODE", "disabled")

HOOK = "blocks.0.hook_out"
D_MODEL = 32  # conftest.build_tiny_model's width


def build(args: list[str]) -> None:
    """saelab-dashboard in this process (the model loads in a second, not after a fresh interpreter's imports)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:  # success returns; bad input exits 2
        if exit_.code not in (0, None):
            raise


def read_latent(dashboard: Path, latent: int) -> dict:
    """A latents/<id>.js file is `window.SAELAB_LATENT(<json>);`."""
    text = (dashboard / "latents" / f"{latent:05d}.js").read_text()
    match = re.fullmatch(r"window\.SAELAB_LATENT\((.*)\);\s*", text, flags=re.S)
    assert match, text[:200]
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> Path:
    """A short training run on the tiny model: `.hydra/config.yaml`, metrics.json, sae/."""
    out = tmp_path_factory.mktemp("dashboard_runs")
    result = run_cli([*tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "data.train_tokens=5120",
                      "eval.spliced_windows=0", "logger=none", "data.cache=off"])
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p.parent for p in out.rglob("metrics.json")]
    return run


@pytest.fixture(scope="module")
def dashboard(run_dir) -> Path:
    build([run_dir, "latents=top:5+random:3+7", "tokens=1e6", "contexts=4"])
    return run_dir / "dashboard"


# -- the data written -------------------------------------------------------------------------------------------
def test_dashboard_of_a_run_directory(run_dir, dashboard):
    summary = json.loads((dashboard / "summary.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    d_sae = metrics["d_sae"]
    assert summary["sae"] == {"architecture": "standard", "d_in": D_MODEL, "d_sae": d_sae, "hook": HOOK,
                              "model_name": "tiny"}
    assert json.loads((run_dir / "sae" / "cfg.json").read_text())["metadata"]["has_model"] is True
    assert summary["metrics"]["fvu"] == pytest.approx(metrics["fvu"])
    assert summary["metrics"]["l0"] == pytest.approx(metrics["l0"])
    hist = summary["density"]
    assert sum(hist["counts"]) + hist["dead"] == hist["total"] == d_sae
    assert len(hist["edges"]) == len(hist["counts"]) + 1

    latents = summary["latents"]
    ids = [entry["id"] for entry in latents]
    assert ids[0] == 7 and latents[0]["chosen_by"] == "listed"  # listed first, then top, then random
    assert [entry["chosen_by"] for entry in latents].count("random") == 3
    top = [entry for entry in latents if entry["chosen_by"] == "top"]
    assert 4 <= len(top) <= 5  # 4 when the listed latent 7 is itself among the 5 most frequent (test below)
    # `top` = the most frequently firing: no latent outside it fires more often than the least of it.
    assert min(e["fires"] for e in top) >= max(e["fires"] for e in latents if e["chosen_by"] != "top" and e["id"] != 7)
    assert [e["fires"] for e in top] == sorted((e["fires"] for e in top), reverse=True)
    # One file per chosen latent, no more; each holds what the summary says.
    assert sorted(p.name for p in (dashboard / "latents").iterdir()) == sorted(f"{i:05d}.js" for i in ids)
    n_tokens = summary["held_out"]["tokens"]
    for entry in latents:
        record = read_latent(dashboard, entry["id"])
        assert record["fires"] == entry["fires"]
        assert record["density"] == pytest.approx(entry["fires"] / n_tokens, rel=1e-3)
        assert sum(record["histogram"]["counts"]) == record["fires"]
        assert len(record["contexts"]) <= 4 and bool(record["contexts"]) == bool(record["fires"])
        maxima = [c["max"] for c in record["contexts"]]
        assert maxima == sorted(maxima, reverse=True)
        if maxima:
            assert maxima[0] == pytest.approx(record["max"])
        assert record["logits"] is not None and len(record["logits"]["up"]) == 10  # GPT-2 is a causal LM
    assert summary["logit_note"] is None
    assert (dashboard / "index.html").stat().st_size < 200_000  # the page carries a summary, not the data


def _planted_sae(directory: Path, seed: int = 0) -> torch.Tensor:
    """A SAELens "standard" export whose latent 0 reads a random direction u (latent 1 reads -u, latent 2 another
    direction): with zero biases, f_0(x) = relu(x . u) on raw activations. Returns u."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(D_MODEL, generator=generator)
    u /= u.norm()
    v = torch.randn(D_MODEL, generator=generator)
    w_enc = torch.stack([u, -u, v / v.norm()], dim=1)  # [d_in, d_sae]
    directory.mkdir(parents=True)
    save_file({"W_enc": w_enc.contiguous(), "W_dec": w_enc.T.contiguous(), "b_enc": torch.zeros(3),
               "b_dec": torch.zeros(D_MODEL)}, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D_MODEL, "d_sae": 3, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"model_name": "tiny", "hook_name": HOOK, "context_size": 32, "prepend_bos": True},
    }))
    return u


def _expected_activations(model_dir: Path, corpus_dir: Path, u: torch.Tensor):
    """The held-out windows, a keep mask, h . u at every position and W_U, computed here without the dashboard:
    the windows from the data pipeline, h from a plain transformers forward (block 0's output)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from saelab.data.sources.text_files import text_file_documents
    from saelab.data.tokens import SpecialTokens, keep_mask, pack, split_documents, tokenize

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = SpecialTokens.from_tokenizer(tokenizer)
    eval_fraction = float(OmegaConf.load(CONF_DIR / "data" / "pydocs.yaml").eval_fraction)
    _, held_out = split_documents(text_file_documents(str(corpus_dir)), eval_fraction)
    windows = pack(tokenize(held_out, tokenizer), 32, special, True)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        h = model(windows, output_hidden_states=True).hidden_states[1]  # after block 0, before any final norm
    return windows, keep_mask(windows, special), h @ u, model.lm_head.weight.T


def test_planted_latent_top_contexts_match_an_independent_computation(tiny_model_dir, tiny_corpus_dir, tmp_path):
    sae_dir = tmp_path / "planted"
    u = _planted_sae(sae_dir)
    out = tmp_path / "dash"
    build([sae_dir, "model=tiny", f"model.path={tiny_model_dir}", "data=text_files", f"data.path={tiny_corpus_dir}",
           "latents=[0,1]", "tokens=1e6", "contexts=5", "window=3", f"out={out}"])
    windows, keep, projection, w_u = _expected_activations(tiny_model_dir, tiny_corpus_dir, u)
    acts = torch.relu(projection)  # latent 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"] == {"tokens": int(keep.sum()), "windows": len(windows)}
    assert [(e["id"], e["chosen_by"]) for e in summary["latents"]] == [(0, "listed"), (1, "listed")]

    record = read_latent(out, 0)
    fired = (acts > 0) & keep
    assert record["fires"] == int(fired.sum())
    assert record["max"] == pytest.approx(float(acts[keep].max()), rel=1e-3)
    # The expected ranking: windows by their maximum over real-text positions, highest first.
    window_max = torch.where(keep, acts, torch.tensor(-1.0)).max(dim=1)
    expected = torch.argsort(window_max.values, descending=True)[:5].tolist()
    assert [c["window"] for c in record["contexts"]] == expected
    for context, w in zip(record["contexts"], expected, strict=True):
        pos = int(window_max.indices[w])
        assert context["pos"] == pos
        assert context["max"] == pytest.approx(float(window_max.values[w]), rel=1e-3)
        lo, hi = max(0, pos - 3), min(32, pos + 4)
        assert context["ids"] == windows[w, lo:hi].tolist()
        assert context["center"] == pos - lo
        for got, want, real in zip(context["acts"], acts[w, lo:hi].tolist(), keep[w, lo:hi].tolist(), strict=True):
            assert (got is None) if not real else got == pytest.approx(want, rel=1e-3, abs=1e-5)
    # Latent 1 reads -u: it fires exactly where latent 0 is negative.
    assert read_latent(out, 1)["fires"] == int(((projection < 0) & keep).sum())
    # Logit effects: W_dec[0] = u, so the raised tokens are the top of u @ W_U.
    assert [t["id"] for t in record["logits"]["up"]] == (u @ w_u).topk(10).indices.tolist()
    assert [t["id"] for t in record["logits"]["down"]] == (-(u @ w_u)).topk(10).indices.tolist()


# -- the pages in a real browser --------------------------------------------------------------------------------
def _chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium; or set SAELAB_CHROMIUM)")
    return binary


def test_summary_and_latent_pages_render_in_headless_chromium(run_dir, dashboard, tmp_path):
    binary = _chromium()
    summary = json.loads((dashboard / "summary.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    dom = dump_dom(file_url(dashboard), binary, workdir=tmp_path)
    assert 'data-view="summary"' in dom  # set by dashboard.js: the script ran
    assert f'<td data-metric="fvu">{metrics["fvu"]:.4g}</td>' in dom
    for entry in summary["latents"]:
        assert f'<a href="#latent={entry["id"]}">{entry["id"]}</a>' in dom

    latent = summary["latents"][1]["id"]
    record = read_latent(dashboard, latent)
    dom = dump_dom(file_url(dashboard, f"latent={latent}"), binary, workdir=tmp_path)
    assert f'data-view="latent:{latent}"' in dom
    assert f"<h2>Latent {latent}" in dom
    assert dom.count('class="context"') == len(record["contexts"]) > 0
    assert dom.count("tok peak") == len(record["contexts"])
    for t in record["logits"]["up"][:3]:
        assert html.escape(json.dumps(t["token"], ensure_ascii=False)[1:-1], quote=False) in dom  # as the page shows it


def test_search_box_navigates_and_reports_latents_not_built(dashboard, tmp_path):
    binary = _chromium()
    summary = json.loads((dashboard / "summary.json").read_text())
    built = [e["id"] for e in summary["latents"]]
    d_sae = summary["sae"]["d_sae"]
    missing = next(i for i in range(d_sae) if i not in built)
    with Chromium(binary, workdir=tmp_path) as browser:
        page = browser.open(file_url(dashboard), 1100, 800)
        assert page.wait_for("document.body.dataset.view") == "summary"
        # Type an id into the search box and press Enter, as a person would.
        page.type_text("#search-input", str(built[2]))
        page.press_enter()
        page.wait_for(f"document.body.dataset.view === 'latent:{built[2]}'")
        assert page.evaluate("location.hash") == f"#latent={built[2]}"
        n_contexts = len(read_latent(dashboard, built[2])["contexts"])
        assert page.evaluate("document.querySelectorAll('#latent .context').length") == n_contexts
        assert page.evaluate("document.getElementById('overview').hidden") is True

        page.evaluate("document.getElementById('search-input').value = ''")
        page.type_text("#search-input", str(missing))
        page.press_enter()
        page.wait_for("document.body.dataset.view === 'message'")
        text = page.evaluate("document.getElementById('message').textContent")
        assert f"Latent {missing} is not in this dashboard" in text and f"latents=[{missing}]" in text

        page.evaluate("document.getElementById('search-input').value = ''")
        page.type_text("#search-input", str(d_sae + 5))
        page.press_enter()
        page.wait_for("document.getElementById('message').textContent.includes('There is no latent')")

        # #search=<id> goes through the search box's own handler.
        page.evaluate(f"location.hash = 'search={built[0]}'")
        page.wait_for(f"document.body.dataset.view === 'latent:{built[0]}'")
        assert page.evaluate("location.hash") == f"#latent={built[0]}"
        page.evaluate("location.hash = ''")
        page.wait_for("document.body.dataset.view === 'summary'")

    png = screenshot(dashboard, tmp_path / "shot.png", fragment=f"latent={built[0]}", width=1100, height=800,
                     binary=binary, workdir=tmp_path)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 150_000


# -- bad input --------------------------------------------------------------------------------------------------
def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("args", "expected"), [
    (["{missing}"], "path='{missing}' is not allowed: expected a run directory (holding sae/cfg.json) or an "
                    "exported SAE directory"),
    (["{empty}"], "path='{empty}' is not allowed"),
    (["{run}", "colour=red"], "colour='red' is not allowed: expected one of the options latents, tokens"),
    (["{run}", "latents=top:x"], "latents='top:x' is not allowed: expected top:N"),
    (["{run}", "latents=[5000]"], "latents=5000 is not allowed: expected latent ids in 0..127"),
    (["{run}", "tokens=0"], "tokens=0 is not allowed: expected an integer >= 1"),
    (["{run}", "model=nonexistent"], "model='nonexistent' is not allowed: expected one of"),
    (["{run}", "model.colour=1"], "model.colour=1 is not allowed: expected a field of model: name, path"),
    (["{run}", "verbose"], "option='verbose' is not allowed: expected key=value"),
    (["{run}", "model.hook=blocks.9.hook_out"], "model.hook='blocks.9.hook_out' is not allowed"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir, tmp_path, capsys, args, expected):
    shutil.rmtree(run_dir / "dashboard", ignore_errors=True)
    (tmp_path / "empty").mkdir()
    names = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), "run": str(run_dir)}
    before = _listing(run_dir), _listing(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**names) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: " + expected.format(**names))
    assert not any(line.startswith("error") for line in err[:-1])
    assert (_listing(run_dir), _listing(tmp_path)) == before


def test_console_script_exit_code(tmp_path):
    script = Path(sys.executable).parent / "saelab-dashboard"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "saelab.dashboard.cli"]
    result = subprocess.run([*command, str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: path='{tmp_path / 'nope'}' is not allowed: expected a run "
                                                  "directory (holding sae/cfg.json) or an exported SAE directory "
                                                  "(holding cfg.json)"]
    assert list(tmp_path.iterdir()) == []


def test_choose_latents_lists_first_then_top_then_random_without_repeats():
    from saelab.dashboard.collect import choose_latents
    from saelab.dashboard.options import LatentSpec

    fires = torch.tensor([5, 9, 0, 7, 9, 1, 3, 0])  # by frequency: 1, 4 (tie: lower id first), 3, 0, 6, 5, ...
    chosen = choose_latents(LatentSpec(top=3, random=2, listed=(4, 2)), fires, seed=0)
    assert chosen[:4] == [(4, "listed"), (2, "listed"), (1, "top"), (3, "top")]  # 4 is listed, not top again
    randoms = [i for i, why in chosen if why == "random"]
    assert len(randoms) == 2 and not set(randoms) & {4, 2, 1, 3} and len(chosen) == 6
    assert choose_latents(LatentSpec(top=3, random=2, listed=(4, 2)), fires, seed=0) == chosen  # seeded
