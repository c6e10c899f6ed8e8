"""Dataset normalisation (SPEC section 0): one scalar C, estimated once before training, then frozen.

The SAE trains on x / C; export folds C back so the saved SAE takes raw activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from saelab.errors import check_choice

METHODS = ("unit_mean_squared_norm", "sqrt_d_model", "none")


def estimate_scale(raw: Tensor, method: str) -> float:
    """C such that x = x_raw / C has E||x||^2 = 1 (unit_mean_squared_norm) or E||x|| = sqrt(n) (sqrt_d_model)."""
    check_choice("data.normalize", method, METHODS)
    if method == "none":
        return 1.0
    raw = raw.double()
    if method == "unit_mean_squared_norm":
        return float(raw.pow(2).sum(-1).mean().sqrt())
    return float(raw.norm(dim=-1).mean() / math.sqrt(raw.shape[-1]))


def normalised_rms(method: str, scale: float, raw_head: Tensor | Callable[[], Tensor]) -> float:
    """sqrt(E||x||^2) of the activations that set the scale (or of what a function returns), once normalised by
    it: the factor the SAEs' scale-dependent knobs convert by. Exactly 1 under unit_mean_squared_norm, where the
    activations are not read (a cached run reads no rows for it)."""
    if method == "unit_mean_squared_norm":
        return 1.0
    raw = raw_head if isinstance(raw_head, Tensor) else raw_head()
    return float(raw.double().pow(2).sum(-1).mean().sqrt()) / scale
