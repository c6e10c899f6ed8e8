"""Model diffing: saelab-finetune's deterministic fine-tune, and a crosscoder over the same hook of two models
(model.diff_with: the second model's hooks are the sites diff/<hook>) trained, spliced into each model, exported
and re-measured by saelab-eval."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from saelab.data.activations import window_activations
from saelab.data.cache_key import ModelSpec
from saelab.data.model import load_model
from saelab.metrics import registry
from tests.conftest import assert_one_line_refusal, build_tiny_model, run_cli, run_module, tiny_overrides
from tests.test_dashboard import build, read_latent

HOOK = "blocks.1.hook_out"


def finetune_args(tiny_model_dir, tiny_corpus_dir, out, *extra: str) -> list[str]:
    return ["--out", str(out), "--steps", "12", "--lr", "3e-3", *extra, "model=tiny", f"model.path={tiny_model_dir}",
            "data=text_files", f"data.path={tiny_corpus_dir}", "data.context_size=32"]


@pytest.fixture(scope="module")
def tuned_dir(tiny_model_dir, tiny_corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "model"
    result = run_module("saelab.cli.finetune", finetune_args(tiny_model_dir, tiny_corpus_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def pair(tiny_model_dir, tuned_dir, hooks):
    return load_model({"name": "tiny", "path": str(tiny_model_dir), "hook": hooks, "dtype": "float32",
                       "device": "cpu", "diff_with": str(tuned_dir)})


def test_the_finetune_is_deterministic_learns_and_loads_like_any_local_model(tiny_model_dir, tiny_corpus_dir,
                                                                             tuned_dir, tmp_path):
    again = tmp_path / "again"
    result = run_module("saelab.cli.finetune", finetune_args(tiny_model_dir, tiny_corpus_dir, again))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (load_file(str(d / "model.safetensors")) for d in (tuned_dir, again))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert first.keys() == second.keys() == base.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # same seed, same weights, bit for bit
    assert any(not torch.equal(first[k], base[k]) for k in first)
    record = json.loads((tuned_dir / "finetune.json").read_text())
    assert record["objective"] == "next-token" and record["mean_loss_last_tenth"] < record["first_loss"]
    loaded = load_model({"name": "tuned", "path": str(tuned_dir), "hook": HOOK, "dtype": "float32", "device": "cpu"})
    assert loaded.tokenizer.get_vocab() == load_model({"name": "tiny", "path": str(tiny_model_dir), "hook": HOOK,
                                                       "dtype": "float32", "device": "cpu"}).tokenizer.get_vocab()
    # an existing --out is refused in one line, and left as it was
    refused = run_module("saelab.cli.finetune", finetune_args(tiny_model_dir, tiny_corpus_dir, again))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: --out")
    assert torch.equal(load_file(str(again / "model.safetensors"))["transformer.wte.weight"],
                       second["transformer.wte.weight"])


def test_each_site_of_a_pair_reads_its_own_model(tiny_model_dir, tuned_dir):
    windows = torch.randint(2, 150, (3, 16), generator=torch.Generator().manual_seed(0))
    models = pair(tiny_model_dir, tuned_dir, [HOOK, f"diff/{HOOK}"])
    both = window_activations(models, windows)
    alone = {name: load_model({"name": name, "path": str(path), "hook": HOOK, "dtype": "float32", "device": "cpu"})
             for name, path in (("base", tiny_model_dir), ("tuned", tuned_dir))}
    assert torch.equal(both[HOOK], window_activations(alone["base"], windows)[HOOK])
    assert torch.equal(both[f"diff/{HOOK}"], window_activations(alone["tuned"], windows)[HOOK])
    assert not torch.allclose(both[HOOK], both[f"diff/{HOOK}"])
    # each site's cache is keyed by its own model's files and hook
    spec, tuned = ModelSpec.of(models, f"diff/{HOOK}"), ModelSpec.of(alone["tuned"], HOOK)
    assert (spec.source, spec.hook) == (tuned.source, tuned.hook) != (ModelSpec.of(models, HOOK).source, HOOK)


def test_a_crosscoder_over_two_models_trains_splices_into_each_and_exports(tiny_model_dir, tiny_corpus_dir,
                                                                           tuned_dir, tmp_path):
    """In one fan-out group beside an SAE on the fine-tune's hook alone: one stream runs both models."""
    base = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path), "sae=batchtopk", "sae.k=8",
            f"model.diff_with={tuned_dir}"]
    result = run_cli(["-m", *base, "hydra/launcher=fanout", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                      f"model.hook=diff/{HOOK},[{HOOK},diff/{HOOK}]", "eval.spliced_windows=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jobs #0, #1 share one activation stream" in result.stdout + result.stderr
    tuned_only = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    run = tmp_path / "sweep" / "1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sites"] == [HOOK, f"diff/{HOOK}"] and set(metrics["site_fvu"]) == set(metrics["sites"])
    assert 0 < metrics["fvu"] < 1 and 0 < sum(metrics["relative_norm_histogram"]) <= metrics["d_sae"]  # fired ones
    # spliced into each model: the base's metrics by their names, the fine-tune's as diff_<name>
    assert math.isfinite(metrics["ce_sae"]) and math.isfinite(metrics["diff_ce_sae"])
    assert metrics["diff_ce_clean"] == pytest.approx(tuned_only["ce_clean"], rel=1e-6)  # the fine-tune's clean pass
    assert metrics["diff_ce_clean"] != pytest.approx(metrics["ce_clean"], rel=1e-4)
    assert registry.get("diff_ce_sae").better == "lower" and registry.find("diff_fvu") is None
    exported = json.loads((run / "sae" / "cfg.json").read_text())
    assert exported["metadata"]["hook_names"] == metrics["sites"]
    assert exported["metadata"]["diff_with"] == str(tuned_dir)
    # saelab-eval loads both models from the export's metadata and measures the same
    out = tmp_path / "eval"
    evaluated = run_module("saelab.cli.evaluate", [str(run / "sae"), *base[:-1], "--out", str(out),
                                                   "eval.spliced_windows=0"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["sites"] == metrics["sites"] and again["fvu"] == pytest.approx(metrics["fvu"], rel=1e-4)
    # and so does the dashboard: each latent's decoder norm in each model
    build([run, "latents=top:2", "tokens=1e6", "contexts=2"])
    latent = json.loads((run / "dashboard" / "summary.json").read_text())["latents"][0]["id"]
    assert set(read_latent(run / "dashboard", latent)["site_norms"]) == set(metrics["sites"])


@pytest.mark.parametrize(("overrides", "field"), [
    ([f"model.hook=[{HOOK},diff/{HOOK}]"], "model.diff_with"),  # a second model's site with no second model
    (["model.hook=diff/blocks.0.hook_out", f"model.target_hook={HOOK}", "model.diff_with=TUNED"],
     "model.target_hook"),  # a transcoder from one model into the other
    ([f"model.hook=[{HOOK},diff/{HOOK}]", "model.diff_with=NARROW"], "model.diff_with"),  # another width
])
def test_bad_diffing_inputs_are_one_line_errors(overrides, field, tiny_model_dir, tiny_corpus_dir, tuned_dir,
                                                tmp_path):
    narrow = tmp_path / "narrow"
    if any("NARROW" in o for o in overrides):
        build_tiny_model(narrow, d_model=16)
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"),
            *(o.replace("TUNED", str(tuned_dir)).replace("NARROW", str(narrow)) for o in overrides)]
    assert_one_line_refusal(args, field, tmp_path / "out")
