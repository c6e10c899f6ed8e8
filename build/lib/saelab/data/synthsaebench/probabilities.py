"""Base firing probabilities of a SynthSAEBench world: a Zipf law mapped by index onto [min, max].

    w_i = (i + 1)^-s,    p_i = min + (max - min) (w_i - w_{N-1}) / (w_0 - w_{N-1})

so feature 0 fires with probability max and feature N - 1 with min; nothing is scaled to a target L0 (the L0
follows from these, the hierarchy and the exclusion: expectation.py). Computed in float32 as SAELens's
`zipfian_firing_probabilities` is.
"""

from __future__ import annotations

import torch
from torch import Tensor


def zipf_probabilities(n_features: int, exponent: float, max_probability: float, min_probability: float) -> Tensor:
    """[N] float32 base probabilities p_i (module docstring); a single feature gets max."""
    if n_features == 1:
        return torch.tensor([max_probability])
    weight = 1.0 / torch.arange(1, n_features + 1, dtype=torch.float32) ** exponent
    low, high = weight.min(), weight.max()
    return min_probability + (max_probability - min_probability) * (weight - low) / (high - low)
