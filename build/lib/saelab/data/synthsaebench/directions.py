"""The feature directions and bias of a SynthSAEBench world.

Directions start as N Gaussian vectors normalised to unit length; the bias is one more Gaussian vector scaled to
`bias_norm` (both from one generator seeded with the world's seed, in that order, as SAELens's FeatureDictionary
draws them). Then `steps` Adam steps (learning rate `lr`) lower the orthogonality loss

    L(D) = sum_{i != j} (d_i . d_j)^2 + N sum_i (||d_i||^2 - 1)^2

and the rows are normalised again. Its gradient needs no [N, N] matrix (G = D D^T):

    dL/dD = 4 (G D - diag(G) D) + 4 N (diag(G) - 1) D,    G D = D (D^T D)

so a step costs O(N d^2), not O(N^2 d) (SAELens forms G in chunks and backpropagates; the gradient is the same,
up to floating-point rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_directions(n_features: int, d: int, bias_norm: float, seed: int) -> tuple[Tensor, Tensor]:
    """(unit rows [N, d], bias [d]) drawn from a generator seeded with `seed`; bias zero when bias_norm is 0."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_features, d, generator=g)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-8)
    if not bias_norm:
        return rows, torch.zeros(d)
    bias = torch.randn(d, generator=g)
    return rows, bias / bias.norm().clamp(min=1e-8) * bias_norm


def orthogonality_gradient(rows: Tensor) -> Tensor:
    """dL/dD of the module docstring's loss."""
    square = (rows * rows).sum(1, keepdim=True)  # diag(G)
    return 4 * (rows @ (rows.T @ rows) - square * rows) + 4 * rows.shape[0] * (square - 1) * rows


def orthogonalize(rows: Tensor, steps: int, lr: float) -> Tensor:
    """`steps` Adam steps on L from the normalised rows, then unit rows again."""
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-8)
    if steps > 0:
        param = torch.nn.Parameter(rows.clone())
        optimizer = torch.optim.Adam([param], lr=lr)
        for _ in range(steps):
            with torch.no_grad():
                param.grad = orthogonality_gradient(param.data)
            optimizer.step()
        rows = param.data
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-8)
