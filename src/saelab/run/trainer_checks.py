"""The trainer section, checked before a Trainer exists: precision (Lightning's values and saelab's auto/tf32),
devices, nodes and the step count, each refused in one line naming the field."""

from __future__ import annotations

import re
import typing

from omegaconf import ListConfig

from saelab.errors import ConfigError
from saelab.run.precision import SAELAB_PRECISIONS

# What lightning.pytorch.Trainer(precision=...) accepts (its _PRECISION_INPUT), read from Lightning when possible.
_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
               "transformer-engine-float16")
_PRECISION_ALIASES = ("64", "32", "16", "bf16", 64, 32, 16)


def lightning_precisions() -> tuple:
    """Every value Lightning's Trainer accepts for `precision` (full names first, then the aliases)."""
    try:
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    except ImportError:  # a Lightning without this private name: the list above (Lightning 2.x)
        return _PRECISIONS + _PRECISION_ALIASES
    values = [v for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal)]
    full = [v for v in _PRECISIONS if v in values]
    full += [v for v in values if isinstance(v, str) and "-" in v and v not in full]
    return tuple(full) + tuple(v for v in values if v not in full)


def check_precision(value) -> None:
    allowed = SAELAB_PRECISIONS + lightning_precisions()
    if value is None:  # Lightning's default
        return
    if isinstance(value, bool) or value not in allowed:
        full = ", ".join(str(v) for v in allowed if isinstance(v, str) and ("-" in v or v in SAELAB_PRECISIONS))
        aliases = ", ".join(dict.fromkeys(str(v) for v in allowed if not (isinstance(v, str) and "-" in v)))
        raise ConfigError("trainer.precision", value, f"one of {full} (or the aliases {aliases})")


def check_devices(value) -> None:
    """Lightning's `devices`: "auto", a positive count, -1 (all), "0,1"-style indices, or a list of indices."""
    if isinstance(value, ListConfig):
        value = list(value)
    ok = (
        value == "auto"
        or (isinstance(value, int) and not isinstance(value, bool) and (value > 0 or value == -1))
        or (isinstance(value, str) and bool(re.fullmatch(r"\s*(-1|[1-9]\d*|\d+\s*(,\s*\d+\s*)*,\s*(\d+)?)\s*", value)))
        or (isinstance(value, list) and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
    )
    if not ok:
        raise ConfigError("trainer.devices", value,
                          "a positive integer, -1 (all), 'auto', or a non-empty list of device indices")
