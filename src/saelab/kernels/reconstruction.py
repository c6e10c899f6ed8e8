"""The reconstruction error E_b ||x_hat_b - x_b||^2 as one autograd Function: SquaredError for a dense x_hat, and
SparseReconstructionError for x_hat = Z W_dec + b_dec with Z sparse (decoded through sparse_products.py's
SparsePattern, the difference formed as the decoder accumulates).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saelab.kernels.sparse_products import SparsePattern


class SquaredError(torch.autograd.Function):
    """E_b ||x_hat - x||^2 (summed over the last dimension, averaged over the others) in two passes instead of
    six: the difference is formed once and kept, the sum of squares is one dot product, and the backward
    pass is one scaling of the kept difference."""

    @staticmethod
    def forward(ctx: Any, x_hat: Tensor, x: Tensor) -> Tensor:
        diff = x_hat - x
        n_rows = diff.numel() // diff.shape[-1]
        ctx.diff, ctx.n_rows = diff, n_rows
        flat = diff.reshape(-1)
        return torch.dot(flat, flat) / n_rows

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        grad = ctx.diff * (2 * g / ctx.n_rows)
        need = ctx.needs_input_grad
        return (grad if need[0] else None), (-grad if need[1] else None)


class SparseReconstructionError(torch.autograd.Function):
    """(E_b ||x_hat_b - x_b||^2, x_hat - x) for x_hat = Z W_dec + b_dec, Z sparse: SparseDecode, the bias and
    SquaredError in one pass over [B, d_in] (the difference is formed as the decoder accumulates; natively, its
    squared norm too). The difference is returned without a gradient (AuxK's residual is its negation).

    Backward with s = 2 g / B: d values_j = s W_dec[latent_j] . diff[row_j], dW_dec = Z^T (s diff) (s is folded
    into Z's 131k values, not the [B, d_in] difference), db_dec = s sum_b diff.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                pattern: SparsePattern) -> tuple[Tensor, Tensor]:
        diff, row_sq = pattern.decode(values, W_dec, bias=b_dec, minus=x, row_sq=True, span=pattern.decoder_span)
        ctx.save_for_backward(values, W_dec, diff)
        ctx.pattern = pattern
        ctx.mark_non_differentiable(diff)
        ctx.set_materialize_grads(False)
        return row_sq.sum() / diff.shape[0], diff

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, _g_diff: Tensor | None):
        grads: list[Tensor | None] = [None] * 5
        if g is None:
            return tuple(grads)
        values, W_dec, diff = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need = ctx.needs_input_grad
        scale = 2 * g / diff.shape[0]
        if need[0]:
            grads[0] = pattern.entry_dots(W_dec, diff, span=pattern.decoder_span) * scale
        if need[1]:
            grads[1] = pattern.transpose_times(values * scale, diff, span=pattern.decoder_span)[0]
        if need[2]:
            grads[2] = diff.sum(0) * scale
        if need[3]:  # training never asks for it (x is data)
            grads[3] = diff * -scale
        return tuple(grads)
