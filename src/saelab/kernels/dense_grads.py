"""The passes the fused dense Functions (fused_relu.py, fused_gated.py) share between their matmuls.

Both work in place on a [B, d_sae] buffer or fill only the gradients autograd asks for, so a backward pass makes
no fresh [B, d_sae] tensor for them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.kernels.block_products import DENSE, DenseProducts


def keep_where_positive(values: Tensor, sign_of: Tensor, out: Tensor) -> Tensor:
    """values * 1[sign_of > 0] in one float pass (out may alias values)."""
    return torch.ops.aten.threshold_backward.grad_input(values, sign_of, 0, grad_input=out)


def encoder_grads(grads: list, need: tuple[bool, ...], g_pre: Tensor, x: Tensor, W_enc: Tensor,
                  products: DenseProducts = DENSE) -> None:
    """Fill grads[0:3] (x, W_enc, b) of pi = x W_enc + b from dL/dpi, computing only what autograd needs (W_enc's
    by `products`: a CLT's over its blocks)."""
    if need[0]:
        grads[0] = g_pre @ W_enc.t()
    if need[1]:
        grads[1] = products.encoder_grad(x, g_pre)
    if need[2]:
        grads[2] = g_pre.sum(0)
