"""Experiment loggers from the `logger` config group: W&B (online or offline), CSV, or none."""

from __future__ import annotations

import logging
import netrc
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

log = logging.getLogger(__name__)


def quiet_third_party() -> None:
    """The console says what saelab does, and third-party chatter is silenced here, at its source, in one place:
    Lightning's info lines (its litlogger tip, "GPU available", "`Trainer.fit` stopped") go below its loggers'
    level while its warnings and errors still show; the one deprecation torch raises from inside Lightning's own
    code (nothing a user can act on) is filtered by its message and category. W&B's banner and run summary are off
    through its `silent` setting (_wandb_run); saelab logs the offline `wandb sync` hint and an online run's URL."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def wandb_api_key_configured() -> bool:
    """True if W&B could log online: WANDB_API_KEY is set, or ~/.netrc has an api.wandb.ai entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_loggers(logger_cfg: Mapping[str, Any] | None, run_dir: Path, run_name: str | None = None,
                  group: str | None = None) -> list:
    """Instantiate the configured loggers; W&B runs get a name and group unless the config sets them.

    Each W&B logger gets a run of its own (wandb.init with reinit="create_new"), so the jobs of a group,
    trained in one process, log to one run each."""
    loggers = []
    for name, cfg in (logger_cfg or {}).items():
        cfg = dict(cfg)
        if "WandbLogger" in str(cfg.get("_target_", "")):
            cfg["name"] = cfg.get("name") or run_name
            cfg["group"] = cfg.get("group") or group
            if cfg.get("offline") == "auto":
                cfg["offline"] = not wandb_api_key_configured()
            if cfg["offline"] or os.environ.get("WANDB_MODE") == "offline":
                log.info("W&B is offline: upload this run later with `wandb sync %s/wandb/offline-run-*`",
                         cfg.get("save_dir", run_dir))
            cfg["experiment"] = _wandb_run(cfg)
        log.debug("logger %s: %s", name, cfg)
        loggers.append(instantiate(cfg))
    return loggers


def _wandb_run(cfg: Mapping[str, Any]):
    """A new W&B run with the arguments WandbLogger would pass to wandb.init."""
    import wandb

    init = {"name": cfg.get("name"), "project": cfg.get("project"), "dir": cfg.get("save_dir"),
            "id": cfg.get("id") or cfg.get("version"), "resume": "allow", "group": cfg.get("group"),
            "entity": cfg.get("entity"), "tags": list(cfg.get("tags") or []) or None, "reinit": "create_new"}
    if cfg.get("offline"):
        init["mode"] = "offline"
    # silent: no banner or run summary on the console (W&B's warnings still show); saelab says where the run is.
    run = wandb.init(**{k: v for k, v in init.items() if v is not None}, settings=wandb.Settings(silent=True))
    if not run.offline and not run.disabled:
        log.info("W&B run: %s", run.url)
    return run


def close_loggers(loggers: list, status: str) -> None:
    """Flush and end each logger; a W&B run is finished (its offline files are complete for `wandb sync`)."""
    for logger in loggers:
        logger.finalize(status)
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish(exit_code=0 if status == "success" else 1)


def finish_wandb() -> None:
    """End the W&B run even after a failure, so the next job of a multirun starts clean."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
