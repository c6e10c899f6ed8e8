"""SAELAB_KERNELS: which kernels the user asked for (auto, torch or triton), read where kernels are chosen.

A module of its own so that kernels/dispatch.py, which decides, and kernels/native.py, which must not build its
library when another choice was forced, both read it without importing each other.
"""

from __future__ import annotations

import os

from saelab.errors import ConfigError

VARIABLE = "SAELAB_KERNELS"
CHOICES = ("auto", "torch", "triton")


def requested() -> str:
    """The SAELAB_KERNELS choice (auto if unset); anything else is refused by name."""
    value = os.environ.get(VARIABLE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigError(VARIABLE, value, CHOICES)
    return value
