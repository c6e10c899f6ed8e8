"""Reconstruction metrics (SPEC section 5), accumulated over batches of any size.

FVU's numerator and denominator are summed separately over all eval tokens (never a mean of per-batch
ratios); the denominator is the variance about the mean, from sum ||x||^2 - n ||mean x||^2 in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens is "dense"


class ReconstructionMetrics:
    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum_x: Tensor | None = None
        self.sum_sq_x = 0.0
        self.sse = 0.0
        self.sum_sq_xhat = 0.0
        self.sum_dot = 0.0
        self.sum_cos = 0.0
        self.sum_norm_ratio = 0.0
        self.active = 0
        self.fire_counts = torch.zeros(self.d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        fired = f > 0
        self.n += x.shape[0]
        sx = x.sum(0).cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_sq_x += float(x.pow(2).sum())
        self.sse += float((x - x_hat).pow(2).sum())
        self.sum_sq_xhat += float(x_hat.pow(2).sum())
        self.sum_dot += float((x * x_hat).sum())
        x_norm, xhat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.sum_cos += float(((x * x_hat).sum(-1) / (x_norm * xhat_norm).clamp_min(1e-12)).sum())
        self.sum_norm_ratio += float((xhat_norm / x_norm.clamp_min(1e-12)).sum())
        self.active += int(fired.sum())
        self.fire_counts += fired.sum(0).double().cpu()

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no evaluation tokens were seen")
        variance = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n
        fvu = self.sse / variance if variance > 0 else math.nan
        density = self.fire_counts / self.n
        return {
            "l0": self.active / self.n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sse / self.n,
            "shrinkage": self.sum_sq_xhat / self.sum_dot if self.sum_dot != 0 else math.nan,
            "cosine": self.sum_cos / self.n,
            "norm_ratio": self.sum_norm_ratio / self.n,
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > DENSE_THRESHOLD).double().mean()),
            "tokens": float(self.n),
        }

    def log10_density(self) -> Tensor:
        """Per-latent log10 firing frequency; latents that never fired get -inf (plot them separately)."""
        return torch.log10(self.fire_counts / max(self.n, 1))
