"""The Gaussian copula that correlates a SynthSAEBench world's firing.

    z = F u + sqrt(diag) * eta,    u ~ N(0, I_r),  eta ~ N(0, I_N),    fires_i = z_i > Phi^-1(1 - q_i)

with F [N, r] of N(0, std^2) entries (drawn from a generator seeded with seed + 4) and diag_i = 1 - ||F_i||^2, so
each z_i is standard normal and feature i fires with its own probability q_i, while features sharing factor
directions fire together (corr(z_i, z_j) = F_i . F_j). A row with ||F_i||^2 > 0.99 is shrunk to 0.99 (diag >= 0.01),
as SAELens's `generate_random_low_rank_correlation_matrix` does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

SEED_OFFSET = 4
MIN_DIAG = 0.01


class Copula(NamedTuple):
    factor: Tensor  # [N, r]
    diag: Tensor  # [N]: 1 - ||F_i||^2


def random_copula(n_features: int, rank: int, std: float, seed: int) -> Copula:
    """The factor and diagonal for `seed` (the world's seed; the generator is seeded with seed + 4)."""
    g = torch.Generator().manual_seed(seed + SEED_OFFSET)
    factor = torch.randn(n_features, rank, generator=g) * std
    square = (factor**2).sum(1)
    capped = 1 - square < MIN_DIAG
    factor[capped] *= torch.sqrt((1 - MIN_DIAG) / square[capped].unsqueeze(1))
    return Copula(factor, 1 - (factor**2).sum(1))


def thresholds(probability: Tensor) -> Tensor:
    """Phi^-1(1 - q) = sqrt(2) erfinv(1 - 2 q): z_i above it with probability q_i (-inf where q = 1)."""
    return math.sqrt(2) * torch.erfinv(1 - 2 * probability)
