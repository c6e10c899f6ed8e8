"""A run's config, composed the one way saelab-train composes it: conf/train.yaml with command-line overrides.

saelab-train composes through @hydra.main (which also makes the run directory); every other tool that needs the
config a run with the same overrides would get (saelab-eval, saelab-cache, saelab-dashboard, the up-front
checks) calls `compose_run_config` here, so they cannot drift from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def compose_run_config(overrides: Sequence[str] = (), hydra_section: bool = False) -> DictConfig:
    """conf/train.yaml composed with `overrides` (unresolved); `hydra_section`: with Hydra's own config too
    (hydra.run.dir, the launcher), as a run would see it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_section)
