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
from omegaconf import DictConfig, OmegaConf

from saelab.callbacks import PeriodicEval
from saelab.cli_checks import CONF_DIR, check_group_overrides
from saelab.config_checks import check_run_config
from saelab.data.datamodule import ActivationDataModule
from saelab.data.model import load_model, package_model_path
from saelab.errors import ConfigError
from saelab.export import export_sae
from saelab.io import write_json
from saelab.loggers import build_loggers, finish_wandb
from saelab.metrics.evaluate import evaluate_sae
from saelab.module import SAEModule
from saelab.saes.base import build_sae

log = logging.getLogger("saelab")

OmegaConf.register_new_resolver("package_model_path", package_model_path, replace=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job in Hydra's run directory and return its metrics."""
    started = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_run_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    sae = build_sae(OmegaConf.to_container(cfg.sae, resolve=True))
    model = load_model(cfg.model)
    if model.d_model != sae.d_in:
        raise ConfigError("sae.d_in", sae.d_in, f"the model's d_model ({model.d_model}); set model.d_model")

    datamodule = ActivationDataModule(cfg.data, model, cfg.eval.tokens, cfg.seed)
    datamodule.setup()
    batch_size = int(cfg.data.batch_size)
    max_steps = cfg.trainer.get("max_steps") or math.ceil(float(cfg.data.train_tokens) / batch_size)
    module = SAEModule(sae, cfg.optim, max_steps, cfg.dead_window_tokens)
    module.norm_scale.fill_(datamodule.scale)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.eval.every_n_steps:
        callbacks.append(PeriodicEval(datamodule.eval_acts, cfg.eval.every_n_steps, cfg.eval.batch_size))
    loggers = build_loggers(cfg.get("logger"), run_dir)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["max_steps"] = int(max_steps)
    trainer: L.Trainer = instantiate(trainer_cfg, logger=loggers or False, callbacks=callbacks,
                                     default_root_dir=str(run_dir))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics, log10_density = evaluate_sae(sae, datamodule.eval_acts, int(cfg.eval.batch_size))
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
        "tokens_trained": int(trainer.global_step) * batch_size,
        "normalization_scale": float(datamodule.scale),
        "wall_time_s": time.time() - started,
        "overrides": list(HydraConfig.get().overrides.task),
    }
    write_json(run_dir / "metrics.json", result)
    for logger in loggers:
        logger.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=int(trainer.global_step))
    log.info("held-out: L0 %.1f, FVU %.3f, shrinkage %.3f, dead %.1f%%; %d tokens in %.0f s -> %s",
             metrics["l0"], metrics["fvu"], metrics["shrinkage"], 100 * metrics["dead_fraction"],
             result["tokens_trained"], result["wall_time_s"], run_dir)
    return result


def _discard_incomplete_run_dir(run_dir: Path) -> None:
    """A run rejected before any work leaves no directory behind that could look like a result."""
    if run_dir.is_dir() and not (run_dir / "metrics.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_entry(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        result = train(cfg)
        objective = cfg.get("optimized_metric")
        return float(result[objective]) if objective else None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        _discard_incomplete_run_dir(run_dir)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)
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
