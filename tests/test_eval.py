"""saelab-eval: any SAELens-format SAE measured on a saelab run's held-out activations; init_from: fine-tuning
from one. SAEs saved by SAELens itself come from tests/fixtures/saelens (scripts/saelens_compat/
make_eval_fixtures.py made them with sae-lens 6.54, together with SAELens's own outputs on fixed inputs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.saes.saelens_format import load_exported
from tests.conftest import REPO, run_cli, run_module, tiny_overrides

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
COMPARED = ("l0", "fvu", "explained_variance", "shrinkage", "cosine", "dead_fraction", "ce_clean", "ce_sae",
            "ce_zero", "kl_sae")


def run_eval(args: list[str]) -> subprocess.CompletedProcess:
    return run_module("saelab.cli.evaluate", args)


def trained_run(tiny_model_dir, tiny_corpus_dir, out: Path, extra: list[str]) -> tuple[Path, list[str]]:
    overrides = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "eval.spliced_windows=8", *extra]
    result = run_cli(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = out.rglob("metrics.json")
    return metrics_file.parent, overrides


@pytest.fixture(scope="module")
def relu_run(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """One ReLU run on the tiny model, shared by the tests that evaluate or fine-tune from its export."""
    return trained_run(tiny_model_dir, tiny_corpus_dir, tmp_path_factory.mktemp("relu_run") / "outputs",
                       ["sae=relu"])


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "skip_transcoder"])
def test_eval_of_saelabs_own_export_gives_the_runs_metrics(transcoder, relu_run, tiny_model_dir, tiny_corpus_dir,
                                                           tmp_path):
    extra = ["sae=jumprelu", "model.hook=blocks.0.mlp.hook_in", "model.target_hook=blocks.0.mlp.hook_out",
             "sae.skip=true"]
    run_dir, overrides = (trained_run(tiny_model_dir, tiny_corpus_dir, tmp_path / "outputs", extra) if transcoder
                          else relu_run)
    result = run_eval([str(run_dir / "sae"), *overrides, "--out", str(tmp_path / "eval")])
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((run_dir / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in COMPARED:
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-4, abs=1e-6), key
    assert evaluated["architecture"] == trained["architecture"] and evaluated["trained_by"] == "saelab"

    # saelab-report tables it beside the run (both directories under one root).
    shutil.copytree(tmp_path / "eval", run_dir.parent / "eval-of-sae")
    report = subprocess.run([sys.executable, "-m", "saelab.reports.report", str(run_dir.parent), "--wandb", "off"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (run_dir.parent / "report.csv").read_text()
    assert trained["variant"] in table and f"eval:{trained['architecture']}" in table


@pytest.mark.parametrize("name", ["standard", "jumprelu", "skip_transcoder"])
def test_saelens_saved_saes_load_with_saelens_outputs(name):
    """saelab's reader of the format gives SAELens's own encode and forward on the inputs SAELens saw."""
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    sae = load_exported(FIXTURES / name)
    with torch.no_grad():
        assert torch.allclose(sae.encode(expected["x"]), expected["latents"], atol=1e-5)
        assert torch.allclose(sae(expected["x"]), expected["output"], atol=1e-5)
        active = (expected["latents"] > 0).float().mean()
    assert 0 < active < 1  # neither nothing nor everything fires: the comparison means something


@pytest.mark.parametrize("name", ["standard", "skip_transcoder"])
def test_eval_of_an_sae_saved_by_saelens(name, tiny_model_dir, tiny_corpus_dir, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "outputs")
    result = run_eval([str(FIXTURES / name), *overrides, "eval.spliced_windows=4", "--out", str(tmp_path / "eval")])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["architecture"] == name and metrics["trained_by"] == "unknown"
    assert metrics["hook_name"] == ("blocks.0.hook_out" if name == "standard" else "blocks.0.mlp.hook_in")
    assert metrics["ce_sae"] > 0
    # What SAELens's own formulas give on the held-out activations (the first eval.tokens real-text positions of
    # the held-out windows, read here with the bridge's run_with_cache).
    l0, fvu = saelens_metrics(name, overrides)
    assert 0 < l0 < 64
    assert metrics["l0"] == pytest.approx(l0, rel=1e-5) and metrics["fvu"] == pytest.approx(fvu, rel=1e-4)


def saelens_metrics(name: str, overrides: list[str]) -> tuple[float, float]:
    """(L0, FVU) of a fixture on the run's held-out activations, from SAELens's forward written out here:
    standard f = ReLU((x - b_dec) W_enc + b_enc); skip-transcoder f = ReLU(x W_enc + b_enc), predicting the MLP's
    output as f W_dec + b_dec + x W_skip^T. FVU = sum ||t - t_hat||^2 / sum ||t - mean t||^2."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saelab.data.datamodule import ActivationDataModule
    from saelab.data.model import load_model
    from saelab.data.sources import build_source
    from saelab.data.tokens import keep_mask
    from saelab.run.compose import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    data, model_cfg = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model"))
    hook, target = ("blocks.0.hook_out", None) if name == "standard" else ("blocks.0.mlp.hook_in",
                                                                            "blocks.0.mlp.hook_out")
    model = load_model(model_cfg, hooks=[hook] + ([target] if target else []))
    dm = ActivationDataModule(data, model, int(cfg.eval.tokens), int(cfg.seed), source=build_source(data))
    windows = dm.windows(train=False)["eval"]
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(windows, names_filter=model.hooks)
    keep = keep_mask(windows, dm.special)
    n = int(cfg.eval.tokens)
    x = cache[hook][keep][:n].float()
    t = cache[target][keep][:n].float() if target else x
    w = load_file(str(FIXTURES / name / "sae_weights.safetensors"))
    if target:
        f = torch.relu(x @ w["W_enc"] + w["b_enc"])
        t_hat = f @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    else:
        f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        t_hat = f @ w["W_dec"] + w["b_dec"]
    fvu = (t - t_hat).pow(2).sum() / (t - t.mean(0)).pow(2).sum()
    return float((f > 0).sum(-1).float().mean()), float(fvu)


def test_bad_input_fails_with_one_line(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    from saelab.cli.evaluate import main

    overrides = tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "outputs")
    unknown = tmp_path / "unknown"
    shutil.copytree(FIXTURES / "standard", unknown)
    cfg = json.loads((unknown / "cfg.json").read_text())
    (unknown / "cfg.json").write_text(json.dumps(cfg | {"architecture": "crosscoder"}))
    narrow = tmp_path / "narrow"
    shutil.copytree(FIXTURES / "standard", narrow)
    (narrow / "cfg.json").write_text(json.dumps(cfg | {"metadata": cfg["metadata"] | {"hook_name":
                                                                                       "blocks.0.mlp.hook_post"}}))
    normalised = tmp_path / "normalised"
    shutil.copytree(FIXTURES / "standard", normalised)
    (normalised / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": "expected_average_only_in"}))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(FIXTURES / "standard" / "cfg.json", no_weights)
    truncated = tmp_path / "truncated"  # a copy cut short (an interrupted download): found before the model loads
    shutil.copytree(FIXTURES / "standard", truncated)
    weights = truncated / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases = [
        ([str(tmp_path / "nothing-here")], "sae_dir="),
        ([str(normalised)], "normalize_activations='expected_average_only_in' is not allowed"),
        ([str(unknown)], "architecture='crosscoder' is not allowed"),
        ([str(FIXTURES / "standard"), "model.hook=blocks.0.hook_outt"], "model.hook='blocks.0.hook_outt' is not"),
        ([str(narrow)], "model.hook='blocks.0.mlp.hook_post' is not allowed: expected a hook d_model (32) wide"),
        ([str(FIXTURES / "standard"), "model.target_hook=blocks.0.mlp.hook_out"], "model.target_hook="),
        ([str(FIXTURES / "standard"), "data.path=${oops}"], "oops"),  # an interpolation that does not resolve
        ([str(FIXTURES / "standard"), "--out", "/proc/saelab-eval"], "--out='/proc/saelab-eval' is not allowed"),
        ([str(no_weights)], "sae_dir="),
        ([str(truncated)], f"sae_dir='{weights}' is not allowed: expected a readable safetensors file"),
    ]
    for args, message in cases:  # in this process: saelab-eval's main(), as the console script calls it
        out = tmp_path / "eval"
        code = main([*args[:1], *overrides, *args[1:], *(["--out", str(out)] if "--out" not in args else [])])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and message in errors[0], errors
        assert not out.exists()


def test_eval_writes_where_hydra_run_dir_says(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    """hydra.run.dir among the overrides is where metrics.json goes (as for saelab-train), and an unwritable one is
    refused by that name; without it (or --out) the default stays outputs/eval/<date>/<time>."""
    from saelab.cli.evaluate import main

    overrides = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "outputs"), "eval.spliced_windows=0"]
    run_dir = tmp_path / "runs" / "my-eval"
    assert main([str(FIXTURES / "standard"), *overrides, f"hydra.run.dir={run_dir}"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["architecture"] == "standard"
    assert not (tmp_path / "outputs" / "eval").exists()
    capsys.readouterr()
    assert main([str(FIXTURES / "standard"), *overrides, "hydra.run.dir=/proc/saelab-eval"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "hydra.run.dir='/proc/saelab-eval' is not allowed" in errors[0], errors


def random_sae(variant: str, transcoder: bool, seed: int):
    from saelab.saes import build_sae
    from tests.test_transcoder import SPARSITY, TARGETS

    torch.manual_seed(seed)
    sae = build_sae({"_target_": TARGETS[variant], "d_in": 16, "d_sae": 64, "decoder_constraint": "none",
                     **SPARSITY[variant], **({"d_out": 12, "skip": True} if transcoder else {})})
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith(("W_", "b_", "r_")):
                p.normal_(0, 0.3)
        if hasattr(sae, "threshold_batches"):
            sae.threshold.fill_(0.2 + 0.1 * seed)
    return sae


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "skip_transcoder"])
@pytest.mark.parametrize("variant", ["relu", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"])
def test_init_from_an_export_reproduces_it_at_step_zero(variant, transcoder, tmp_path):
    """Raw activations in, the export's output out, from an SAE that started elsewhere (another seed)."""
    from saelab.saes.saelens_format import export_sae, import_sae

    scale, target_scale = 7.5, (0.3 if transcoder else None)
    source = random_sae(variant, transcoder, seed=0).eval()
    directory = export_sae(source, scale, tmp_path / "sae", {}, target_scale=target_scale)
    fresh = random_sae(variant, transcoder, seed=1).eval()
    import_sae(fresh, directory, scale, target_scale)
    x_raw = scale * torch.randn(64, 16)
    out_scale = target_scale or scale
    with torch.no_grad():
        assert torch.allclose(out_scale * fresh(x_raw / scale), load_exported(directory)(x_raw), atol=1e-4)
        for name, p in source.named_parameters():  # the same SAE, parameter for parameter
            assert torch.allclose(p, dict(fresh.named_parameters())[name], atol=1e-6), name


def test_init_from_through_the_cli_starts_from_the_exported_function(relu_run, tmp_path):
    run_dir, overrides = relu_run
    first = json.loads((run_dir / "metrics.json").read_text())
    again = [o for o in overrides if not o.startswith("paths.output_dir")]
    out = tmp_path / "fine-tuned"
    # One step at a vanishing learning rate: what it evaluates is the function it started from.
    result = run_cli([*again, f"paths.output_dir={out}", f"init_from={run_dir / 'sae'}", "optim.lr=1e-12",
                      "trainer.max_steps=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = out.rglob("metrics.json")
    tuned = json.loads(metrics_file.read_text())
    for key in ("l0", "fvu", "ce_sae"):
        assert tuned[key] == pytest.approx(first[key], rel=1e-4), key
    wrong = run_cli([*again, f"paths.output_dir={tmp_path / 'wrong'}", f"init_from={run_dir / 'sae'}", "sae=topk"])
    errors = [line for line in wrong.stderr.splitlines() if line.startswith("error: ")]
    assert wrong.returncode == 2 and len(errors) == 1 and "init_from=" in errors[0], wrong.stderr[-2000:]
