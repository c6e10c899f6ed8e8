"""Kill a run with SIGKILL part way, resume it with ckpt_path=last, and get the uninterrupted run's result."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, run_until_then_kill, tiny_overrides

pytestmark = pytest.mark.slow

INTERVAL = 20  # checkpoint interval in steps
STEPS = 200


CROSSCODER = "model.hook=[blocks.0.hook_out,blocks.1.hook_out]"
CLT = ["model.hook=[blocks.0.hook_resid_mid,blocks.1.hook_resid_mid]",
       "model.target_hook=[blocks.0.hook_mlp_out,blocks.1.hook_mlp_out]"]


def _overrides(model_dir: Path, corpus_dir: Path, out: Path, cache: Path, variant: str, data_cache: str
               ) -> list[str]:
    sites = [CROSSCODER] if variant.startswith("crosscoder") else []
    if variant == "clt":  # a cross-layer transcoder: JumpReLU with Ameisen et al.'s tanh penalty
        sites, variant = [*CLT, "sae.sparsity=tanh", "sae.decoder_constraint=none"], "jumprelu"
    return [
        *tiny_overrides(model_dir, corpus_dir, out), *sites, f"paths.cache_dir={cache}", f"sae={variant}",
        f"data.cache={data_cache}",
        f"data.train_tokens={STEPS * 256}", "trainer.deterministic=true", "trainer.log_every_n_steps=1",
        f"callbacks.model_checkpoint.every_n_train_steps={INTERVAL}", "+logger.csv.flush_logs_every_n_steps=1",
        "eval.spliced_windows=0",
    ]


def _logged_steps(run_dir: Path) -> int:
    """The highest step the CSV logger has flushed (it writes every step here)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return -1
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return max((int(r["step"]) for r in rows if r.get("step")), default=-1)


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# topk from the cache; a cross-layer transcoder (JumpReLU over two layers' MLP inputs and outputs, each site with
# its own scale, zero blocks kept) streamed: both data paths, both kinds of step, one site and several (CI time:
# relu-auto adds nothing new, and a crosscoder's several sites are a CLT's reads alone)
@pytest.mark.parametrize(("variant", "data_cache"), [("topk", "auto"), ("clt", "off")])
def test_sigkill_then_resume_equals_an_uninterrupted_run(variant, data_cache, tiny_model_dir, tiny_corpus_dir,
                                                        tmp_path):
    """From the activation cache, and streamed from the model (data.cache=off: the stream is regenerated)."""
    cache = tmp_path / "cache"
    whole_out, killed_out = tmp_path / "whole", tmp_path / "killed"
    whole = run_cli(_overrides(tiny_model_dir, tiny_corpus_dir, whole_out, cache, variant, data_cache))
    assert whole.returncode == 0, whole.stderr[-3000:]
    (whole_dir,) = {p.parent for p in whole_out.rglob("metrics.json")}

    # The same run, killed without warning once a checkpoint exists and more steps have been done since.
    args = _overrides(tiny_model_dir, tiny_corpus_dir, killed_out, cache, variant, data_cache)
    def checkpointed_and_past_it() -> bool:
        found = list(killed_out.rglob("checkpoints/last.ckpt"))
        return bool(found) and _logged_steps(found[0].parent.parent) >= INTERVAL + INTERVAL // 2

    proc = run_until_then_kill(args, checkpointed_and_past_it)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    (last,) = killed_out.rglob("checkpoints/last.ckpt")
    run_dir = last.parent.parent
    steps_done = _logged_steps(run_dir)
    saved_step = _checkpoint_step(last)
    assert not (run_dir / "metrics.json").exists()  # a killed run does not look complete
    assert 0 < saved_step < STEPS
    # At most one checkpoint interval of work is lost (CSV steps count from 0: step s is the (s+1)-th).
    assert steps_done + 1 - saved_step <= INTERVAL, (steps_done, saved_step)

    resumed = run_cli([*args, f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the activation stream after {saved_step} batches" in resumed.stdout + resumed.stderr

    expected = json.loads((whole_dir / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["steps"] == expected["steps"] == STEPS
    for key in ("l0", "fvu", "explained_variance", "shrinkage", "dead_fraction", "normalization_scale"):
        assert got[key] == expected[key], (key, got[key], expected[key])
    expected_weights = load_file(whole_dir / "sae" / "sae_weights.safetensors")
    got_weights = load_file(run_dir / "sae" / "sae_weights.safetensors")
    for name, value in expected_weights.items():
        assert torch.equal(got_weights[name], value), name
    print(f"{variant}, data.cache={data_cache}: killed after {steps_done + 1} steps, resumed from step {saved_step} "
          f"({steps_done + 1 - saved_step} steps redone); final FVU {got['fvu']:.4f}, L0 {got['l0']:.2f}")


def test_resume_without_a_checkpoint_is_a_one_line_error_and_keeps_the_directory(
    tiny_model_dir, tiny_corpus_dir, tmp_path
):
    run_dir = tmp_path / "old_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("keep me")
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"), f"hydra.run.dir={run_dir}",
            "ckpt_path=last"]
    result = run_cli(args, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "ckpt_path='last' is not allowed" in errors[0], result.stderr[-2000:]
    assert (run_dir / "notes.txt").read_text() == "keep me"
