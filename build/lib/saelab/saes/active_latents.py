"""A batch's selected latents kept as their active entries, and what a TopK-style training step carries with
them (the selection, for AuxK; each reconstruction's residual)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from saelab.kernels.sparse_products import SparsePattern, csr_offsets


@dataclass
class ActiveLatents:
    """A batch's active latents as a sparse [batch, d_sae] matrix of entries (rows, latents, values).

    Entries are grouped by token (rows sorted), which is what `embedding_bag`'s offsets need.
    """

    rows: Tensor
    latents: Tensor
    values: Tensor
    batch_size: int
    d_sae: int

    def dense(self) -> Tensor:
        return self.values.new_zeros(self.batch_size, self.d_sae).index_put_((self.rows, self.latents),
                                                                              self.values)

    def fired(self) -> Tensor:
        """[d_sae] bool: latents with a positive value on some token (no dense tensor is built)."""
        positive = self.values.detach().clamp_min(0).float()
        return positive.new_zeros(self.d_sae).index_add_(0, self.latents, positive) > 0

    def active_count(self) -> Tensor:
        return (self.values > 0).sum()

    def detach(self) -> ActiveLatents:
        return dataclasses.replace(self, values=self.values.detach())

    def decode(self, W_dec: Tensor) -> Tensor:
        """sum_j values_j W_dec[latents_j] per token, reading (and back-propagating to) only the used rows."""
        return F.embedding_bag(self.latents, W_dec, csr_offsets(self.rows, self.batch_size)[:-1], mode="sum",
                               per_sample_weights=self.values.to(W_dec.dtype))


@dataclass
class Selection:
    """A training batch's selection: the input, the active latents (values carry their gradient) and what AuxK
    reuses. Fused path: `pattern` is set, `pre` (if not None) is x W_enc without autograd and `pre_bias` the bias
    still to add to it, `bias` the folded encoder bias. Autograd path: `pre` is the dense pre-activations."""

    x: Tensor
    active: ActiveLatents
    pre: Tensor | None
    pattern: SparsePattern | None = None
    bias: Tensor | None = None
    pre_bias: Tensor | None = None


@dataclass
class Residual:
    """sg(t - x_hat) of one reconstruction, and the latent ids [start, stop) whose dead ones AuxK fits to it:
    given as `values`, or as sg(x_hat) in `prediction`, subtracted only if AuxK needs it (a pass saved)."""

    start: int
    stop: int
    values: Tensor | None = None
    prediction: Tensor | None = None

    def of(self, t: Tensor) -> Tensor:
        return self.values if self.values is not None else (t - self.prediction).detach()
