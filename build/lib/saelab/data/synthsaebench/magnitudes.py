"""Per-feature magnitude parameters of a SynthSAEBench world. A firing feature's raw activation is
relu(mean_i + std_i z), z ~ N(0, 1) (sampler.py), with

- mean_i falling linearly with the index: mean_i = start + (end - start) i / (N - 1);
- std_i folded normal: std_i = |mu + sigma g_i|, g ~ N(0, I_N) drawn from a generator seeded with seed + 1.

`from_saelens` reads any of SAELens's magnitude settings (a number, or a dict with generator_name constant,
linear, exponential or folded_normal), drawing exactly what SAELens draws for the same seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

STD_SEED_OFFSET, MEAN_SEED_OFFSET = 1, 2  # SAELens's seeds for the std and mean generators: seed + 1, seed + 2


def linear(n_features: int, start: float, end: float) -> Tensor:
    if n_features == 1:
        return torch.tensor([start], dtype=torch.float32)
    return torch.linspace(start, end, n_features)


def exponential(n_features: int, start: float, end: float) -> Tensor:
    if n_features == 1:
        return torch.tensor([start], dtype=torch.float32)
    return start * (end / start) ** torch.linspace(0, 1, n_features)


def folded_normal(n_features: int, mean: float, std: float, seed: int | None, min_value: float | None = None,
                  max_value: float | None = None) -> Tensor:
    if seed is None:
        raise ValueError("a folded-normal magnitude needs the world's seed to be drawn again")
    g = torch.Generator().manual_seed(seed)
    values = (mean + torch.randn(n_features, generator=g) * std).abs()
    if min_value is not None or max_value is not None:
        values = values.clamp(min=min_value, max=max_value)
    return values


def from_saelens(setting: float | dict[str, Any], n_features: int, seed: int | None) -> Tensor:
    """[N] float32 values of a SAELens magnitude setting (a number, or a config dict), `seed` its generator's."""
    if isinstance(setting, (int, float)):
        return torch.full((n_features,), float(setting), dtype=torch.float32)
    kind = setting.get("generator_name")
    if kind == "constant":
        return torch.full((n_features,), float(setting.get("value", 1.0)), dtype=torch.float32)
    if kind == "linear":
        return linear(n_features, setting["start"], setting["end"])
    if kind == "exponential":
        return exponential(n_features, setting["start"], setting["end"])
    if kind == "folded_normal":
        return folded_normal(n_features, setting.get("mean", 0.0), setting.get("std", 0.1), seed,
                             setting.get("min_value"), setting.get("max_value"))
    raise ValueError(f"unknown SAELens magnitude generator {kind!r} (constant, linear, exponential, folded_normal)")
