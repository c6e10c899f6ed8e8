"""The main job end to end through the real CLI, in a subprocess, on the tiny model."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelab.saes.saelens_format import load_exported
from tests.conftest import REPO, run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("metrics.json"))


def test_main_job_writes_a_complete_run_directory(tiny_model_dir, tiny_corpus_dir, tmp_path):
    out = tmp_path / "outputs"
    result = run_cli([*tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "sae.sparsity_coefficient=0.1",
                      "optim.lr=3e-3"])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = _run_dirs(out)
    assert run_dir.parent.parent == out  # outputs/<date>/<time>/
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("l0", "fvu", "explained_variance", "shrinkage", "dead_fraction", "tokens_trained", "wall_time_s"):
        assert math.isfinite(metrics[key]), key
    assert metrics["tokens_trained"] == 100 * 256
    # Training on structured text must learn: far better than predicting the mean (FVU 1).
    assert metrics["fvu"] < 0.3, metrics
    assert 1 <= metrics["l0"] < metrics["d_sae"] / 2, metrics
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "csv" / "metrics.csv").read_text().count("loss/rec") == 1
    # The export takes raw activations and reproduces the trained SAE's reconstructions.
    exported = load_exported(run_dir / "sae")
    assert exported.cfg["architecture"] == "standard" and exported.cfg["d_sae"] == 128
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    scale = float(ckpt["state_dict"]["norm_scale"])
    assert scale == pytest.approx(metrics["normalization_scale"])
    assert exported.cfg["metadata"]["normalization_scale_folded"] == pytest.approx(scale)


def test_wandb_offline_run_is_written_for_wandb_sync(tiny_model_dir, tiny_corpus_dir, tmp_path):
    out = tmp_path / "outputs"
    args = [a for a in tiny_overrides(tiny_model_dir, tiny_corpus_dir, out) if not a.startswith("logger=")]
    result = run_cli([*args, "logger=wandb", "data.train_tokens=2560"])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = _run_dirs(out)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    (log_file,) = offline_runs[0].glob("*.wandb")
    logged = log_file.read_bytes()  # the binary run log `wandb sync` uploads: keys appear as strings
    for key in (b"loss/rec", b"loss/sparsity", b"coef/sparsity", b"train/l0", b"final/fvu", b"final/l0",
                b"final/log10_feature_density"):
        assert key in logged, key
    assert "wandb sync" in result.stdout + result.stderr


def test_the_console_shows_saelabs_lines_and_nothing_else(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """A short run with W&B (offline, and not silenced by WANDB_SILENT as the other tests are) prints saelab's log
    lines only: no Lightning tip or GPU/TPU lines, no third-party deprecation warning, no W&B banner or summary,
    no weight-loading bar."""
    out = tmp_path / "outputs"
    args = [a for a in tiny_overrides(tiny_model_dir, tiny_corpus_dir, out) if not a.startswith("logger=")]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"} | {"WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "saelab.cli.train", *args, "logger=wandb", "trainer.max_steps=10",
                             "eval.spliced_windows=0"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = (result.stdout + result.stderr).replace("\r", "\n")
    for noise in ("litlogger", "Tip:", "GPU available", "TPU available", "deprecated", "Warning", "wandb:",
                  "Loading weights", "`Trainer.fit` stopped"):
        assert noise not in printed, (noise, printed[-3000:])
    lines = [line for line in printed.splitlines() if line.strip()]
    assert any("held-out: L0" in line for line in lines) and any("wandb sync" in line for line in lines), printed
    assert all(re.match(r"\[[^]]+\]\[saelab[\w.]*\]\[\w+\] - ", line) for line in lines), printed[-3000:]


def test_multirun_writes_one_directory_per_job(tiny_model_dir, tiny_corpus_dir, tmp_path):
    out = tmp_path / "outputs"
    result = run_cli(["-m", *tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "data.train_tokens=2560",
                      "sae.sparsity_coefficient=0.001,0.1"])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _run_dirs(out / "multirun")
    assert len(runs) == 2
    l0 = {json.loads((r / "metrics.json").read_text())["overrides"][-1]: json.loads(
        (r / "metrics.json").read_text())["l0"] for r in runs}
    assert l0["sae.sparsity_coefficient=0.001"] > l0["sae.sparsity_coefficient=0.1"]


def test_a_failing_multirun_job_is_recorded_and_the_others_still_run(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """Job 0 diverges (a runtime failure), job 1 is an invalid point (a config error), job 2 trains."""
    out = tmp_path / "outputs"
    result = run_cli(["-m", *tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "data.train_tokens=2560",
                      "eval.spliced_windows=0", "optim.lr_warmup_steps=0", "optim.lr=1e30,-1,3e-3"])
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (out / "multirun").glob("*/*")
    jobs = {p.name: p for p in sweep.iterdir() if p.is_dir()}
    assert set(jobs) == {"0", "1", "2"}
    assert "non-finite loss at step" in (jobs["0"] / "error.txt").read_text()
    assert "optim.lr=-1 is not allowed" in (jobs["1"] / "error.txt").read_text()
    assert not (jobs["0"] / "metrics.json").exists() and not (jobs["1"] / "metrics.json").exists()
    assert json.loads((jobs["2"] / "metrics.json").read_text())["fvu"] < 1


def test_runs_launched_at_the_same_moment_get_their_own_directories(tiny_model_dir, tiny_corpus_dir, tmp_path):
    out = tmp_path / "outputs"
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "data.train_tokens=2560",
            "eval.spliced_windows=0"]
    procs = [subprocess.Popen([sys.executable, "-m", "saelab.cli.train", *args], cwd=REPO, env={**os.environ},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    runs = _run_dirs(out)
    assert len(runs) == 2 and runs[0] != runs[1]  # outputs/<date>/<H-M-S-microseconds>/


BAD_INPUTS = [
    (["sae=nonexistent"], "sae='nonexistent' is not allowed"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.batch_size=-5"], "data.batch_size=-5"),
    (["sae.expansion_factor=-1"], "sae.expansion_factor=-1"),
    (["sae.d_sae=abc"], "sae.d_sae='abc'"),
    (["sae.sparsity=l7"], "sae.sparsity='l7'"),
    (["model.hook=blocks.0.hook_outt"],
     "model.hook='blocks.0.hook_outt' is not allowed: expected a hook of the model such as blocks.0.hook_out"),
    (["data.path=/nonexistent/corpus"], "data.path='/nonexistent/corpus'"),
    (["model.dtype=float8"], "model.dtype='float8'"),
    (["+sae.bandwidth=0.1"], "sae.bandwidth=0.1 is not allowed: expected a field of ReluSAE"),
    (["data.context_size=1000"], "data.context_size=1000 is not allowed: expected at most the model's n_ctx (64)"),
    (["data.cache=/proc/saelab-cache"], "data.cache='/proc/saelab-cache'"),
    (["sae=topk", "sae.k=100000"], "sae.k=100000"),
    (["sae.target_l0=8", "l0_control.signed=true"],
     "l0_control.signed=True is not allowed: expected null or false for ReluSAE"),
    (["sae=jumprelu", "sae.bandwidth=0"], "sae.bandwidth=0"),
    # A sparsity penalty of another variant: l0/tanh are JumpReLU's, l1/ri_l1 ReLU's and Gated's; TopK has none.
    (["sae.sparsity=l0"], "sae.sparsity='l0' is not allowed: expected one of 'l1', 'ri_l1'"),
    (["sae=jumprelu", "sae.sparsity=l1"], "sae.sparsity='l1' is not allowed: expected one of 'l0', 'tanh'"),
    (["sae=gated", "sae.sparsity=tanh"], "sae.sparsity='tanh' is not allowed: expected one of 'l1', 'ri_l1'"),
    # A penalty weighted by ||d_i|| under the unit-norm constraint would be its unweighted twin.
    (["sae.sparsity=ri_l1"], "sae.sparsity='ri_l1' is not allowed: expected it with sae.decoder_constraint=none"),
    (["sae=gated", "sae.sparsity=ri_l1"], "sae.sparsity='ri_l1' is not allowed: expected it with "
     "sae.decoder_constraint=none"),
    (["sae=jumprelu", "sae.sparsity=tanh", "sae.decoder_constraint=unit_norm"],
     "sae.sparsity='tanh' is not allowed: expected it with sae.decoder_constraint=none"),
    (["sae=topk", "+sae.sparsity_coefficient=0.1"],
     "sae.sparsity_coefficient=0.1 is not allowed: expected 0 (sae.k sets the sparsity)"),
    (["paths.output_dir=/proc/saelab-out"],
     "paths.output_dir='/proc/saelab-out' is not allowed: expected a directory saelab can create and write to"),
    (["hydra.run.dir=/proc/saelab-run"],
     "hydra.run.dir='/proc/saelab-run' is not allowed: expected a directory saelab can create and write to"),
    (["data.source=s3"], "data.source='s3' is not allowed: expected 'text_files', the name of the source data._target_ "
                         "names (choose another source with data=<source>)"),
    (["data._target_=saelab.nowhere.Source"], "data._target_='saelab.nowhere.Source' is not allowed: expected an "
     "importable saelab.data.sources.DataSource subclass, e.g. saelab.data.sources.pydocs.PyDocs"),
    (["optim.lr=-0.001"], "optim.lr=-0.001 is not allowed: expected a positive number"),
    (["data.eval_fraction=1.5"], "data.eval_fraction=1.5 is not allowed: expected a fraction strictly between 0 and 1"),
    (["model=gpt3"], "model='gpt3' is not allowed: expected one of gemma-2-2b, gpt2, minilm, pythia-70m, tiny"),
    (["nan_policy=ignore"], "nan_policy='ignore' is not allowed: expected one of 'stop', 'skip'"),
    (["optim.fused=maybe"], "optim.fused='maybe' is not allowed: expected true or false"),
    (["ckpt_path=/nonexistent/x.ckpt"],
     """ckpt_path='/nonexistent/x.ckpt' is not allowed: expected null, "last", or an existing checkpoint file"""),
    (["trainer.precision=8-mixed"],
     "trainer.precision='8-mixed' is not allowed: expected one of auto, tf32, 32-true, bf16-mixed, 16-mixed, "
     "bf16-true, 16-true, 64-true"),
    (["sae=matryoshka_batchtopk", "sae.matryoshka_widths=[32,8,128]"],
     "sae.matryoshka_widths=[32, 8, 128] is not allowed: expected strictly increasing widths ending at d_sae (128)"),
    (["sae.skip=true"], "sae.skip=True is not allowed: expected false for an SAE (a skip connection needs a "
     "transcoder: set model.target_hook)"),
    (["sae.d_out=32"], "sae.d_out=32 is not allowed: expected null for an SAE"),
    (["model.target_hook=blocks.0.hook_out"],
     "model.target_hook='blocks.0.hook_out' is not allowed: expected a hook other than model.hook"),
    (["data=synthetic", "model.target_hook=blocks.0.mlp.hook_out"],
     "model.target_hook='blocks.0.mlp.hook_out' is not allowed: expected null with data=synthetic"),
    (["model.target_hook=blocks.0.mlp.hook_outt"],
     "model.target_hook='blocks.0.mlp.hook_outt' is not allowed: expected a hook of the model such as"),
    (["model.hook=blocks.0.mlp.hook_in", "model.target_hook=blocks.0.mlp.hook_post"],
     "model.target_hook='blocks.0.mlp.hook_post' is not allowed: expected a hook d_model (32) wide, like "
     "model.hook (this one is 128 wide)"),
    (["model.hook=blocks.0.mlp.hook_out", "model.target_hook=blocks.0.mlp.hook_in"],
     "model.target_hook='blocks.0.mlp.hook_in' is not allowed: expected a hook reached after model.hook"),
    (["trainer.devices=0"],
     "trainer.devices=0 is not allowed: expected a positive integer, -1 (all), 'auto', or a non-empty list of device"),
    # A word where conf/ has a number or a flag (config_checks.check_types), before any model loads.
    (["data.seed=abc"], "data.seed='abc' is not allowed: expected an integer"),
    (["eval.spliced_windows=abc"], "eval.spliced_windows='abc' is not allowed: expected a number"),
    (["trainer.log_every_n_steps=often"], "trainer.log_every_n_steps='often' is not allowed: expected a number"),
    (["sae.apply_b_dec_to_input=maybe"], "sae.apply_b_dec_to_input='maybe' is not allowed: expected true or false"),
]


# Only these need the model's weights to be found wrong (its hook names, its n_ctx); every other case must fail
# before the model loads, so it runs with model.path pointing at an empty directory that cannot be loaded.
NEEDS_MODEL = {"model.hook=blocks.0.hook_outt", "data.context_size=1000", "model.target_hook=blocks.0.mlp.hook_outt",
               "model.target_hook=blocks.0.mlp.hook_post", "model.target_hook=blocks.0.mlp.hook_in"}


def _bad_input_case_dirs(root: Path, index: int) -> tuple[Path, Path, Path]:
    """(output dir, earlier run dir holding a metrics.json that must survive, an empty non-model dir)."""
    out = root / f"case{index:02d}" / "outputs"
    earlier = out / "earlier-run"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text("{}")
    not_a_model = root / f"case{index:02d}" / "not-a-model"
    not_a_model.mkdir()
    return out, earlier, not_a_model


@pytest.fixture(scope="module")
def bad_input_results(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Every BAD_INPUTS case run through saelab.cli.train.main() in one subprocess (tests/cli_batch.py)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    cases = []
    for index, (override, _) in enumerate(BAD_INPUTS):
        out, _, not_a_model = _bad_input_case_dirs(root, index)
        model_dir = tiny_model_dir if override[-1] in NEEDS_MODEL else not_a_model
        cases.append([*tiny_overrides(model_dir, tiny_corpus_dir, out), *override])
    (root / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-m", "tests.cli_batch", str(root / "cases.json"), str(root / "results.json")],
                   cwd=REPO, check=True, timeout=600, env={**os.environ})
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.parametrize(("index", "override", "message"), [(i, *b) for i, b in enumerate(BAD_INPUTS)],
                         ids=[b[0][-1] for b in BAD_INPUTS])
def test_bad_input_fails_with_one_line_and_leaves_no_run_directory(index, override, message, bad_input_results):
    root, results = bad_input_results
    result = results[index]
    out, earlier = root / f"case{index:02d}" / "outputs", root / f"case{index:02d}" / "outputs" / "earlier-run"
    assert result["code"] == 2, result["stderr"][-2000:]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result["stderr"][-2000:]
    leftovers = [p for p in out.rglob("*") if p != earlier and earlier not in p.parents]
    assert not leftovers, leftovers  # no file, nor an empty run or date directory
    assert (earlier / "metrics.json").read_text() == "{}"


def test_bad_input_through_the_installed_command_exits_2_with_one_line(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """The table above runs in one process; this runs one case as its own `saelab-train` process."""
    out = tmp_path / "outputs"
    saelab_train = Path(sys.executable).with_name("saelab-train")
    result = subprocess.run([str(saelab_train), *tiny_overrides(tiny_model_dir, tiny_corpus_dir, out),
                             "sae=jumprelu", "sae.bandwidth=0"], capture_output=True, text=True, timeout=300,
                            env={**os.environ})
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in result.stderr.splitlines() if line.strip()], result.stderr[-2000:]
    assert "sae.bandwidth=0 is not allowed" in errors[0]
    assert not list(out.rglob("*"))  # no file, nor an empty run or date directory
