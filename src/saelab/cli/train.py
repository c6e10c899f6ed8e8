"""The main job: `saelab-train [overrides]` (or `python -m saelab.cli.train`).

Validate the config, then train it as a group of one (saelab.run.training: load the model, build the activation
stream, train the SAE with a Lightning Trainer, evaluate on held-out activations, export in SAELens format
and write metrics.json). `-m hydra/launcher=fanout` trains a multirun's jobs in groups through the same path.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saelab.cli.checks import check_group_overrides
from saelab.errors import ConfigError
from saelab.kernels import dispatch
from saelab.run.compose import CONF_PKG
from saelab.run.job import prepare_job, record_failure, report_failure
from saelab.run.loggers import finish_wandb
from saelab.run.training import train_group

log = logging.getLogger("saelab")
__all__ = ["main", "sweep_objective", "train"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job in Hydra's run directory and return its metrics (raise its error if it failed)."""
    job = prepare_job(cfg)
    if job.finished is not None:  # a resumed sweep's job that had finished: its result, not trained again
        return job.finished
    (outcome,) = train_group([job])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def sweep_objective(result: dict[str, Any], cfg: DictConfig) -> float | None:
    """The value a Hydra sweeper minimises: `optimized_metric`, plus `l0_penalty` per unit of L0 outside
    the band `l0_target: [low, high]`, so a search looks for the best fidelity at the sparsity asked for."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    value = float(result[name])
    band = cfg.get("l0_target")
    if band:
        low, high = float(band[0]), float(band[1])
        outside = max(0.0, low - result["l0"]) + max(0.0, result["l0"] - high)
        value += float(cfg.get("l0_penalty", 0.0)) * outside
    return value


def _discard_incomplete_run_dir(run_dir: Path, output_root: Path) -> None:
    """A run rejected before any work leaves no directory behind that could look like a result.

    Only a directory holding nothing but Hydra's own bookkeeping is removed: a run directory being resumed
    (`hydra.run.dir=... ckpt_path=last`) keeps its checkpoints and results whatever goes wrong. Parents left
    empty by that (the date directory) go too, up to but not including `output_root` (paths.output_dir).
    """
    if not run_dir.is_dir():
        return
    if not all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    root, parent = output_root.resolve(), run_dir.resolve().parent
    while root in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


@hydra.main(version_base="1.3", config_path=CONF_PKG, config_name="train")
def hydra_entry(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        result = train(cfg)
        return sweep_objective(result, cfg) if "global_rank" not in result else None
    except Exception as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # this job fails alone (as under hydra/launcher=fanout)
            report_failure(run_dir, err)
            return None
        if isinstance(err, ConfigError):
            print(f"error: {err}", file=sys.stderr)
            _discard_incomplete_run_dir(run_dir, Path(cfg.paths.output_dir))
            sys.exit(2)
        if isinstance(err, FloatingPointError):  # nan_policy=stop: the checkpoints hold finite weights
            record_failure(run_dir, err)
            print(f"error: {err} (nan_policy=stop; see {run_dir / 'error.txt'})", file=sys.stderr)
            sys.exit(1)
        raise
    finally:
        finish_wandb()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    problem = check_group_overrides(sys.argv[1:])
    try:
        dispatch.requested()  # SAELAB_KERNELS, before any set-up (Triton's launch is checked at fit start)
    except ConfigError as err:
        problem = problem or str(err)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_entry()


if __name__ == "__main__":
    main()
