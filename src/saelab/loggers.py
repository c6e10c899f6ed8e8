"""Experiment loggers from the `logger` config group: W&B (online or offline), CSV, or none."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

log = logging.getLogger(__name__)


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
    """Instantiate the configured loggers; W&B runs get a name and group unless the config sets them."""
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
        log.debug("logger %s: %s", name, cfg)
        loggers.append(instantiate(cfg))
    return loggers


def finish_wandb() -> None:
    """End the W&B run even after a failure, so the next job of a multirun starts clean."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
