"""Resuming (issue #33): one command resumes a killed sweep whatever state each job was left in, and a resumed run's
console shows its progress out of the run's steps, without Lightning's warning about its own checkpoint directory.

A kill is simulated on a finished sweep (every checkpoint kept, save_top_k=-1): a job that had checkpointed step 10
of 20 when killed has its step-10 checkpoint as last.ckpt and no results; one killed before its first checkpoint has
no checkpoints and no results. With trainer.deterministic=true the resumed and restarted jobs must end exactly as
the uninterrupted sweep did."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_overrides

pytestmark = pytest.mark.slow

STEPS, INTERVAL = 20, 10
COMPARED = ("steps", "l0", "fvu", "explained_variance", "dead_fraction")


def _args(model_dir: Path, corpus_dir: Path, out: Path) -> list[str]:
    return [*tiny_overrides(model_dir, corpus_dir, out), f"paths.cache_dir={out / 'cache'}", "data.cache=off",
            f"trainer.max_steps={STEPS}", "trainer.deterministic=true", "eval.spliced_windows=0",
            f"callbacks.model_checkpoint.every_n_train_steps={INTERVAL}", "callbacks.model_checkpoint.save_top_k=-1"]


def _killed_after_checkpoint(run_dir: Path) -> None:
    """As if killed after step INTERVAL's checkpoint: last.ckpt is that one, and nothing was finished."""
    checkpoints = run_dir / "checkpoints"
    shutil.copy(checkpoints / f"step{INTERVAL:06d}.ckpt", checkpoints / "last.ckpt")
    (checkpoints / f"step{STEPS:06d}.ckpt").unlink()
    _unfinished(run_dir)


def _unfinished(run_dir: Path) -> None:
    (run_dir / "metrics.json").unlink()
    shutil.rmtree(run_dir / "sae")


def _log(run_dir: Path) -> str:
    return "".join(p.read_text() for p in run_dir.glob("*.log"))


def test_a_killed_sweep_resumes_in_one_command(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """Job 0 finished (kept, not retrained), job 1 has a checkpoint (resumed from it), job 2 has none (trained
    from scratch); the command exits 0 and every job ends as in the uninterrupted sweep."""
    sweep = tmp_path / "sweep"
    args = ["-m", *_args(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"), "seed=0,1,2", "data.seed=0",
            "hydra/launcher=fanout", f"hydra.sweep.dir={sweep}"]
    first = run_cli(args, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    whole = {job: json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1", "2")}
    finished = sweep / "0" / "metrics.json"
    kept = finished.read_bytes(), finished.stat().st_mtime_ns
    _killed_after_checkpoint(sweep / "1")
    _unfinished(sweep / "2")
    shutil.rmtree(sweep / "2" / "checkpoints")

    resumed = run_cli([*args, "ckpt_path=last"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == kept  # not trained (nor evaluated) again
    assert f"resuming the activation stream after {INTERVAL} batches" in _log(sweep / "1")
    assert "resuming the activation stream" not in _log(sweep / "2")
    for job in ("1", "2"):
        got = json.loads((sweep / job / "metrics.json").read_text())
        assert {k: got[k] for k in COMPARED} == {k: whole[job][k] for k in COMPARED}, job
        assert (sweep / job / "sae" / "sae_weights.safetensors").is_file()
    assert not list(sweep.glob("*/error.txt"))


def test_a_resumed_run_shows_its_total_and_no_checkpoint_directory_warning(tiny_model_dir, tiny_corpus_dir,
                                                                           tmp_path):
    """The bar counts on from the checkpoint's step out of the run's steps (11/20 ... 20/20, never N/?), and
    Lightning's "Checkpoint directory ... exists and is not empty" (expected on resume) is not printed or logged."""
    run_dir = tmp_path / "run"
    args = [*_args(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"), f"hydra.run.dir={run_dir}"]
    first = run_cli(args, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    _killed_after_checkpoint(run_dir)

    resumed = run_cli([*args, "ckpt_path=last", "callbacks.progress_bar.refresh_rate=1"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    printed = (resumed.stdout + resumed.stderr).replace("\r", "\n")
    assert f"resuming the activation stream after {INTERVAL} batches" in printed
    for text in (printed, _log(run_dir)):
        assert "Checkpoint directory" not in text, text[-3000:]
    frames = re.findall(r"\| *(\d+)/(\d+|\?) \[", printed)  # tqdm's "n/total [elapsed..."
    counted = [(int(n), total) for n, total in frames if int(n) > 0]
    assert counted and all(total == str(STEPS) for _, total in counted), frames
    assert counted[0][0] == INTERVAL + 1 and counted[-1][0] == STEPS, frames
