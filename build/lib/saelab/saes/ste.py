"""Straight-through estimators for the JumpReLU SAE (SPEC section 3).

JumpReLU f = pi * H(pi - theta) and the L0 count H(pi - theta) are piecewise constant in theta, so their
true gradient with respect to theta is zero almost everywhere. These autograd functions replace the Dirac
delta in the exact derivative by a kernel K of width `bandwidth` (epsilon):

    d f / d theta := -(theta / eps) K((pi - theta) / eps)
    d H / d theta := -(1 / eps) K((pi - theta) / eps)

Averaged over a batch this is a kernel density estimate of the gradient of the *expected* loss. The
comparison pi > theta and the theta gradient are computed in float32, so the threshold keeps its
precision when pi comes out of a bf16 autocast matmul.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2]: unit area, the JumpReLU paper's kernel."""
    return (u.abs() < 0.5).to(u.dtype)


def triangle(u: Tensor) -> Tensor:
    """K(u) = max(0, 1 - |u|): unit area, smoother than the rectangle."""
    return (1.0 - u.abs()).clamp_min(0.0)


KERNELS: dict[str, Callable[[Tensor], Tensor]] = {"rectangle": rectangle, "triangle": triangle}


def _sum_to(grad: Tensor, threshold: Tensor) -> Tensor:
    """Sum a per-token gradient over the leading (batch) dimensions down to theta's per-latent shape."""
    return grad.reshape(-1, threshold.shape[-1]).sum(0).to(threshold.dtype)


def _kernel_window(pre: Tensor, threshold: Tensor, bandwidth: float, kernel: str) -> Tensor:
    """K((pi - theta) / eps) / eps in float32."""
    return KERNELS[kernel]((pre.float() - threshold) / bandwidth) / bandwidth


class JumpReLUFunction(torch.autograd.Function):
    """f = pi * H(pi - theta); d f/d pi = H exactly (plus the STE term if `ste_to_preacts`)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float, kernel: str,
                ste_to_preacts: bool) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.kernel, ctx.ste_to_preacts = bandwidth, kernel, ste_to_preacts
        return torch.where(pre.float() > threshold, pre, 0.0)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        pre, threshold = ctx.saved_tensors
        window = _kernel_window(pre, threshold, ctx.bandwidth, ctx.kernel)
        # The straight-through term theta K / eps: what theta receives with a minus sign.
        ste = threshold * window * grad_out.float()
        grad_pre = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_pre = grad_out * (pre.float() > threshold).to(grad_out.dtype)
            if ctx.ste_to_preacts:
                grad_pre = grad_pre + ste.to(grad_pre.dtype)
        if ctx.needs_input_grad[1]:
            grad_threshold = _sum_to(-ste, threshold)
        return grad_pre, grad_threshold, None, None, None


class StepFunction(torch.autograd.Function):
    """H(pi - theta) as float32 (an exact count); no gradient to pi unless `ste_to_preacts`."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float, kernel: str,
                ste_to_preacts: bool) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.kernel, ctx.ste_to_preacts = bandwidth, kernel, ste_to_preacts
        return (pre.float() > threshold).float()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        pre, threshold = ctx.saved_tensors
        ste = _kernel_window(pre, threshold, ctx.bandwidth, ctx.kernel) * grad_out.float()
        grad_pre = grad_threshold = None
        if ctx.needs_input_grad[0] and ctx.ste_to_preacts:
            grad_pre = ste.to(pre.dtype)
        if ctx.needs_input_grad[1]:
            grad_threshold = _sum_to(-ste, threshold)
        return grad_pre, grad_threshold, None, None, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float, kernel: str = "rectangle",
             ste_to_preacts: bool = False) -> Tensor:
    """pi * H(pi - theta) with the straight-through gradient to theta."""
    return JumpReLUFunction.apply(pre, threshold, bandwidth, kernel, ste_to_preacts)


def step(pre: Tensor, threshold: Tensor, bandwidth: float, kernel: str = "rectangle",
         ste_to_preacts: bool = False) -> Tensor:
    """H(pi - theta) with the straight-through gradient to theta (and to pi if `ste_to_preacts`)."""
    return StepFunction.apply(pre, threshold, bandwidth, kernel, ste_to_preacts)
