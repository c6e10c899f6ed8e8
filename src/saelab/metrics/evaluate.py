"""Run an SAE over held-out activations and return the reconstruction metrics."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from saelab.metrics.reconstruction import ReconstructionMetrics
from saelab.saes.base import SAE


@torch.no_grad()
def evaluate_sae(sae: SAE | torch.nn.Module, acts: Tensor, batch_size: int, firing: list[Tensor] | None = None,
                 targets: Tensor | None = None, observe: Callable[[Tensor, Tensor, Tensor], None] | None = None
                 ) -> tuple[dict[str, float], Tensor]:
    """Metrics on `acts` (normalised held-out activations) and the per-latent log10 firing density. With a
    `firing` list, each batch's [batch, d_sae] bool firing mask (on the CPU) is appended to it, from the same
    encode (ground-truth metrics need it). A transcoder is measured against `targets` (the normalised held-out
    activations of its target hook, row for row with `acts`): FVU, cosine and shrinkage are then the target's.
    `observe(target, output, latents)` sees every batch of the same pass (a crosscoder's site metrics)."""
    was_training = sae.training
    sae.eval()
    device = next(itertools.chain(sae.parameters(), sae.buffers())).device
    metrics = ReconstructionMetrics(sae.d_sae)
    try:
        for start in range(0, len(acts), batch_size):
            x = acts[start : start + batch_size].to(device)
            f = sae.encode(x)
            target = x if targets is None else targets[start : start + batch_size].to(device)
            out = sae.output(x, f)
            metrics.update(target, out, f)
            if observe is not None:
                observe(target, out, f)
            if firing is not None:
                firing.append((f > 0).cpu())
    finally:
        sae.train(was_training)
    return metrics.compute(), metrics.log10_density()
