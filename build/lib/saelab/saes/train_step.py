"""What one training forward returns (TrainStep) and the reconstruction loss every variant uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from saelab.kernels.reconstruction import SquaredError


class SparseLatents(Protocol):
    """A batch's latents stored as their active entries (TopK-style variants); see saes/topk.ActiveLatents."""

    batch_size: int

    def dense(self) -> Tensor: ...

    def fired(self) -> Tensor: ...

    def active_count(self) -> Tensor: ...


@dataclass
class TrainStep:
    """What one training forward returns: the named loss terms (summed into the loss) and the latents.

    The latents feed L0 and the dead-latent bookkeeping. A latent is active on a token when it is > 0.
    """

    terms: dict[str, Tensor]
    latents: Tensor | SparseLatents  # [batch, d_sae], or only the active entries (no dense tensor built)
    extras: dict[str, Tensor] = field(default_factory=dict)  # logged as-is, not part of the loss
    fired_mask: Tensor | None = None  # [d_sae] bool, when the forward already found which latents fired

    @property
    def feature_acts(self) -> Tensor:
        """The latents as a dense [batch, d_sae] tensor (built on demand for sparse latents)."""
        return self.latents if isinstance(self.latents, Tensor) else self.latents.dense()

    @property
    def n_tokens(self) -> int:
        return self.latents.shape[0] if isinstance(self.latents, Tensor) else self.latents.batch_size

    def fired(self) -> Tensor:
        """[d_sae] bool: latents active on at least one token. One max-reduction: (f > 0).any(0) would
        write a [batch, d_sae] mask first (about 10x slower on CPU)."""
        if self.fired_mask is not None:
            return self.fired_mask
        if isinstance(self.latents, Tensor):
            return self.latents.detach().amax(0) > 0
        return self.latents.fired()

    def active_count(self) -> Tensor:
        """Active (token, latent) pairs in the batch (an integer scalar)."""
        if isinstance(self.latents, Tensor):  # count_nonzero of a bool mask: summing the mask is ~10x slower
            return torch.count_nonzero(self.latents.detach() > 0)
        return self.latents.active_count()


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """E_b ||x - x_hat||^2, summed over dimensions (SPEC section 0).

    In float training (no autocast, same dtypes) this is reconstruction.SquaredError: the same value in a third of the
    passes over [B, d_in]."""
    if x.dtype == x_hat.dtype and not torch.is_autocast_enabled(x.device.type):
        return SquaredError.apply(x_hat, x)
    return (x_hat - x).pow(2).sum(-1).mean()
