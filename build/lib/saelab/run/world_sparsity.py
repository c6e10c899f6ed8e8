"""Synthetic defaults that fit their world: on a source that knows its mean L0 (data=synthetic,
data=synthsaebench), a variant given no sparsity of its own trains at that L0.

The variants' YAML defaults (TopK's k 32, ReLU's lambda 0.1, ...) are tuned for MiniLM's activations; on a
synthetic world of mean L0 8 they train k = 32 and recover next to nothing. So when none of `sae.k`,
`sae.target_l0` or `sae.sparsity_coefficient` is given on the command line or by a sweep, `sae.target_l0` is set
to the world's mean L0 (k for TopK/BatchTopK, the L0 controller's target for the others). Passing any of them --
`sae.target_l0=null` included -- keeps the YAML's choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import DictConfig, open_dict

from saelab.data.sources import DataSource

log = logging.getLogger(__name__)

EXPLICIT_KEYS = ("sae.k", "sae.target_l0", "sae.sparsity_coefficient")


def explicit_sparsity(overrides: Sequence[str]) -> bool:
    """Whether the overrides (Hydra's task overrides: command line and sweep) choose the SAE's sparsity."""
    keys = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    return any(key in keys for key in EXPLICIT_KEYS)


def fit_sparsity_to_world(cfg: DictConfig, overrides: Sequence[str], source: DataSource) -> float | None:
    """Set cfg.sae.target_l0 to the source's world's mean L0 where the module docstring says so; returns what it
    set. The mean L0 is asked for only then (a SynthSAEBench world computes it)."""
    if explicit_sparsity(overrides) or cfg.sae.get("target_l0", "absent") is not None:  # absent, or YAML-chosen
        return None
    mean_l0 = source.mean_l0
    if mean_l0 is None:
        return None
    target = round(float(mean_l0), 2)
    with open_dict(cfg):
        cfg.sae.target_l0 = target
    log.info("sae.target_l0 = %g: the synthetic world's mean L0 (pass sae.k, sae.target_l0 or "
             "sae.sparsity_coefficient to choose another sparsity)", target)
    return target
