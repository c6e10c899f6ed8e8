"""The main job: `saelab-train [overrides]` (or `python -m saelab.train`).

Validate the config, load the model, build the activation stream, train the SAE with a Lightning
Trainer, evaluate on held-out activations, export in SAELens format and write metrics.json.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from saelab.callbacks import PeriodicEval
from saelab.cli_checks import CONF_DIR, check_group_overrides
from saelab.config_checks import check_run_config
from saelab.data.datamodule import ActivationDataModule
from saelab.data.model import load_model
from saelab.errors import ConfigError
from saelab.export import export_sae
from saelab.io import write_json
from saelab.loggers import build_loggers, finish_wandb
from saelab.metrics.evaluate import evaluate_sae
from saelab.metrics.spliced import spliced_metrics
from saelab.module import SAEModule
from saelab.saes.base import build_sae

log = logging.getLogger("saelab")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job in Hydra's run directory and return its metrics."""
    started = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_run_config(cfg)
    resume_from = _resume_path(cfg.get("ckpt_path"), run_dir)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    sae = build_sae(OmegaConf.to_container(cfg.sae, resolve=True))
    model = load_model(cfg.model)
    if model.d_model != sae.d_in:
        raise ConfigError("sae.d_in", sae.d_in, f"the model's d_model ({model.d_model}); set model.d_model")

    batch_size = int(cfg.data.batch_size)
    max_steps = run_steps(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.eval.every_n_steps:
        callbacks.append(PeriodicEval(cfg.eval.every_n_steps, cfg.eval.batch_size))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["max_steps"] = int(max_steps)
    trainer: L.Trainer = instantiate(trainer_cfg, logger=False, callbacks=callbacks, default_root_dir=str(run_dir))
    world = int(trainer.world_size)
    if world > 1 and cfg.get("nan_policy") == "skip":  # a rank that skipped its backward would hang the others
        raise ConfigError("nan_policy", "skip", "stop when training on several devices")
    datamodule = ActivationDataModule(cfg.data, model, cfg.eval.tokens, cfg.seed, cache_dir=cfg.paths.cache_dir,
                                      train_tokens=activations_needed(cfg, world))
    datamodule.setup()
    module = SAEModule(sae, cfg.optim, max_steps, cfg.dead_window_tokens, str(cfg.get("nan_policy", "stop")),
                       compile=bool(cfg.get("compile", False)))
    module.norm_scale.fill_(datamodule.scale)
    # Loggers start last, so a config rejected during set-up leaves no logger files behind.
    loggers = build_loggers(cfg.get("logger"), run_dir, *_run_name_and_group())
    trainer.loggers = loggers

    # weights_only: a checkpoint is tensors and plain values; loading one cannot run code.
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    if not trainer.is_global_zero:  # under DDP the other ranks hold the same weights; rank 0 reports
        return {"global_rank": trainer.global_rank, "steps": int(trainer.global_step)}

    metrics, log10_density = evaluate_sae(sae, datamodule.eval_acts, int(cfg.eval.batch_size))
    if cfg.eval.spliced_windows:
        windows = int(cfg.eval.spliced_windows)
        metrics |= _spliced(sae, model, datamodule, windows, int(cfg.data.model_batch_size))
    export_sae(sae, datamodule.scale, run_dir / "sae", {
        "model_name": str(cfg.model.name),
        "hook_name": model.hooks[0],
        "context_size": int(cfg.data.context_size),
        "prepend_bos": bool(cfg.data.prepend_bos),
        "exclude_special_tokens": True,
        "dataset_path": str(cfg.data.get("path") or cfg.data.source),
        "normalization": str(cfg.data.normalize),
        "trained_by": "saelab",
    })
    result = {
        **metrics,
        "variant": sae.__class__.__name__,
        "architecture": sae.saelens_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "steps": int(trainer.global_step),
        "tokens_trained": int(trainer.global_step) * batch_size * world,
        "world_size": world,
        "normalization_scale": float(datamodule.scale),
        "wall_time_s": time.time() - started,
        "overrides": list(HydraConfig.get().overrides.task),
    }
    write_json(run_dir / "metrics.json", result)
    _log_final(loggers, metrics, log10_density, int(trainer.global_step))
    log.info("held-out: L0 %.1f, FVU %.3f, shrinkage %.3f, dead %.1f%%; %d tokens in %.0f s -> %s",
             metrics["l0"], metrics["fvu"], metrics["shrinkage"], 100 * metrics["dead_fraction"],
             result["tokens_trained"], result["wall_time_s"], run_dir)
    return result


def run_steps(cfg: DictConfig) -> int:
    """Optimiser steps of a run: trainer.max_steps, else data.train_tokens / data.batch_size (rounded up)."""
    return int(cfg.trainer.get("max_steps") or math.ceil(float(cfg.data.train_tokens) / int(cfg.data.batch_size)))


def activations_needed(cfg: DictConfig, world_size: int) -> int:
    """Training activations a run reads. Under DDP, data.batch_size and data.train_tokens are per device: each
    rank trains run_steps batches of its own, disjoint from the other ranks'."""
    return run_steps(cfg) * int(cfg.data.batch_size) * world_size


def world_size(cfg: DictConfig) -> int:
    """The number of training processes the configured Trainer would run (building it starts none)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True) | {"max_steps": 1}
    return int(instantiate(trainer_cfg, logger=False, enable_checkpointing=False).world_size)


def _resume_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` means this run directory's checkpoints/last.ckpt, which must exist (resume where a run stopped)."""
    if ckpt_path != "last":
        return ckpt_path
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError("ckpt_path", "last", f"a run directory with a checkpoint ({last} does not exist); "
                          "pass hydra.run.dir=<the run to resume>")
    return str(last)


def _spliced(sae, model, datamodule: ActivationDataModule, n_windows: int, batch_windows: int) -> dict:
    """Downstream metrics with the SAE spliced into the forward pass (raw activations in and out)."""
    scale = datamodule.scale
    device = next(sae.parameters()).device
    sae.eval()

    def reconstruct(x):
        with torch.no_grad():
            return sae(x.to(device).float() / scale) * scale

    return spliced_metrics(model, reconstruct, datamodule.eval_windows[:n_windows], datamodule.special,
                           batch_windows)


def _run_name_and_group() -> tuple[str | None, str | None]:
    """W&B run name from the overrides; multirun jobs share a group named after the sweep directory."""
    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith(("paths.", "hydra", "logger"))]
    name = ",".join(overrides)[:120] or None
    group = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    return name, group


def _log_final(loggers: list, metrics: dict[str, Any], log10_density: torch.Tensor, step: int) -> None:
    numeric = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for logger in loggers:
        logger.log_metrics(numeric, step=step)
        experiment = getattr(logger, "experiment", None)
        if isinstance(logger, WandbLogger) and experiment is not None:
            import wandb

            finite = log10_density[torch.isfinite(log10_density)].numpy()
            experiment.log({"final/log10_feature_density": wandb.Histogram(finite)}, step=step)
            experiment.summary.update(numeric)


def _record_failure(run_dir: Path, err: BaseException) -> None:
    """A failed multirun job keeps its error in its own directory; the sweep goes on."""
    import traceback

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(err)))
    log.error("job failed (%s: %s); details in %s", type(err).__name__, err, run_dir / "error.txt")


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


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_entry(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        result = train(cfg)
        return sweep_objective(result, cfg) if "global_rank" not in result else None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # this job's point is invalid; the sweep goes on
            _record_failure(run_dir, err)
            return None
        _discard_incomplete_run_dir(run_dir, Path(cfg.paths.output_dir))
        sys.exit(2)
    except FloatingPointError as err:  # nan_policy=stop: the run ends; its checkpoints hold finite weights
        _record_failure(run_dir, err)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None
        print(f"error: {err} (nan_policy=stop; see {run_dir / 'error.txt'})", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        _record_failure(run_dir, err)
        return None
    finally:
        finish_wandb()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    problem = check_group_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_entry()


if __name__ == "__main__":
    main()
