"""Fused training kernels for ReLU and JumpReLU: encoder, nonlinearity, sparsity term and decoder in one autograd
Function each (the Gated SAE's is fused_gated.py; TopK/BatchTopK's sparse products are sparse_products.py).

They compute exactly the quantities of the plain PyTorch code in each variant (tests/test_step_equivalence.py
checks loss terms and gradients against a straightforward reference), but with fewer passes over the
[B, d_sae] latents and fewer fresh [B, d_sae] tensors:

* the encoder takes x and the folded bias b_enc - b_dec W_enc (see SAE.encoder_preacts), so no matmul
  computes a gradient for the input;
* the pre-activation is written once (addmm) and the nonlinearity is applied in place where possible;
* the backward pass writes the latent gradient into one reused buffer (SAE.workspace), adds the sparsity
  term's constant gradient inside the GEMM (addmm's bias), and masks it in place.

The elementwise passes between the matmuls run where kernels/dispatch.py says: kernels/native.py's C++ on the
CPU, the Triton launchers of kernels/triton_gpu.py on CUDA (without a host synchronisation), torch operators
otherwise. The matmuls are torch's everywhere, run by the SAE's `products` (block_products.py): a cross-layer
transcoder's over its weight blocks alone.

Used in float (no autocast) training on 2-D batches; the variants fall back to autograd otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saelab.kernels import dispatch, native
from saelab.kernels.block_products import DENSE, DenseProducts
from saelab.kernels.dense_grads import encoder_grads, keep_where_positive


class ReluL1Function(torch.autograd.Function):
    """(x_hat, f, ||f||_1 / B, fired) for f = ReLU(x W_enc + b), x_hat = f W_dec + b_dec; fired ([d_sae] bool) is
    None unless the Triton kernel found it on the way (with the bias, the ReLU and the penalty's sum).

    With a `weight` [d_sae] the penalty is sum_i w_i f_i averaged over the batch (ri_l1: w = ||d_i||; a
    crosscoder's: the sum over sites of its decoder norms), and w gets its gradient (the batch's column sums)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b: Tensor, W_dec: Tensor, b_dec: Tensor,
                workspace: tuple[Tensor, Tensor], weight: Tensor | None = None, products: DenseProducts = DENSE
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        ctx.products = products
        if dispatch.backend_for(x, W_enc, b, W_dec) == "triton":
            f = products.encode(x, W_enc, out=workspace[0])
            total, fired = dispatch.triton_kernels().relu_forward(f, b)
            penalty = total.to(x.dtype) / x.shape[0]
        else:
            f = products.encode(x, W_enc, b, out=workspace[0]).relu_()
            penalty, fired = (f.sum(-1).mean() if weight is None else None), None
        ctx.weight = weight
        if weight is not None:
            ctx.column_sums = f.sum(0)
            penalty = ctx.column_sums @ weight.to(f.dtype) / x.shape[0]
        x_hat = products.decode(f, W_dec, b_dec)
        ctx.save_for_backward(x, W_enc, W_dec, f)
        ctx.workspace = workspace[1]
        ctx.mark_non_differentiable(f)
        ctx.set_materialize_grads(False)
        return x_hat, f, penalty, fired

    @staticmethod
    def backward(ctx: Any, g_xhat: Tensor | None, _g_f: Tensor | None, g_pen: Tensor | None, _g_fired: Tensor | None):
        x, W_enc, W_dec, f = ctx.saved_tensors
        batch = f.shape[0]
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 8
        products: DenseProducts = ctx.products
        if g_xhat is None and g_pen is None:
            return tuple(grads)
        g = ctx.workspace
        pen = (g_pen / batch).to(f.dtype) if g_pen is not None else f.new_zeros(())
        if ctx.weight is not None:  # the weighted penalty: dL/df_i = g w_i / B, dL/dw_i = g sum_b f_bi / B
            if need[6] and g_pen is not None:
                grads[6] = (pen * ctx.column_sums).to(ctx.weight.dtype)
            pen = pen * ctx.weight.to(f.dtype)
        if g_xhat is not None:
            products.decode_t(g_xhat, W_dec, pen.expand(f.shape[1]), out=g)  # dL/df, with the L1 term's gradient
            if need[3]:
                grads[3] = products.decoder_grad(f, g_xhat)
            if need[4]:
                grads[4] = g_xhat.sum(0)
        else:
            g.copy_(pen.expand_as(g))
        keep_where_positive(g, f, out=g)  # ReLU: zero where f == 0
        encoder_grads(grads, need, g, x, W_enc, products)
        return tuple(grads)


class JumpReLUL0Function(torch.autograd.Function):
    """(x_hat, f, L0, fired) for f = pi H(pi - theta), pi = x W_enc + b, L0 = E_b sum_i H(pi_i - theta_i); fired
    ([d_sae] bool: f > 0 on some token) is None unless the native kernel found it on the way.

    The gradients are saes/ste.py's JumpReLUFunction and StepFunction (ste_to_preacts false) summed:
    d/dpi = g_f H; d/dtheta = -sum_b K((pi - theta)/eps)/eps (theta g_f + g_L0 / B), one kernel window.
    The kernel is zero outside a narrow band around theta, so the forward pass keeps only the (token, latent)
    entries inside it (and their kernel values); the backward pass reduces over those entries alone. On the
    CPU in float32 (with theta > 0, as the SAE keeps it) the forward after the matmul is one native pass
    (native.jumprelu_forward: bias, f, L0, the window and the firing mask); otherwise torch operators make
    the same in several passes, pi overwritten by f.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b: Tensor, theta: Tensor, W_dec: Tensor, b_dec: Tensor,
                bandwidth: float, kernel: str, workspace: tuple[Tensor, Tensor], products: DenseProducts = DENSE
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        backend = dispatch.backend_for(x, W_enc, b, theta)
        ctx.bandwidth, ctx.kernel, ctx.backend, ctx.products = bandwidth, kernel, backend, products
        ctx.set_materialize_grads(False)
        if backend == "triton":  # pre keeps p = x W_enc + b for the backward, which recomputes the window from it
            pre = products.encode(x, W_enc, out=workspace[0])
            n_active, fired = dispatch.triton_kernels().jumprelu_forward(pre, b, theta, out=workspace[1])
            f = workspace[1]
            x_hat = products.decode(f, W_dec, b_dec)
            ctx.save_for_backward(x, W_enc, theta, W_dec, f, pre)
            ctx.mark_non_differentiable(f)
            return x_hat, f, n_active.to(x.dtype) / x.shape[0], fired
        # The kernel window: K = 1[|u| < 1/2] (rectangle) or max(0, 1 - |u|) (triangle), u = (pi - theta) / eps.
        width = 0.5 * bandwidth if kernel == "rectangle" else bandwidth
        # With theta > 0 (the SAE keeps it so), H(pi - theta) = 1[f > 0]: backward masks with f, and the native
        # pass applies; otherwise backward needs the (slower) bool mask.
        # On an accelerator (host_sync_free) nothing is read back: theta's sign is not checked (backward keeps
        # the bool mask) and the window stays dense instead of a list of its entries (nonzero).
        sync_free, found = dispatch.host_sync_free(x), None
        theta_positive = not sync_free and bool(theta.min() > 0)
        if backend == "native" and theta_positive:
            pre = products.encode(x, W_enc, out=workspace[0])
            found = native.jumprelu_forward(pre, b, theta, width, bandwidth, out=workspace[1])
            if found is None:
                pre.add_(b)
        else:
            pre = products.encode(x, W_enc, b, out=workspace[0])
        if found is not None:  # f in workspace[1]; backward's dL/df then goes to workspace[0]
            n_active, fired, rows, cols, weights = found
            f, grad_buffer, active = workspace[1], workspace[0], None
            l0 = x.new_tensor(n_active / x.shape[0])
            band = (rows, cols, weights if kernel == "triangle" else None)
        else:
            shifted = torch.sub(pre, theta, out=workspace[1])  # pi - theta
            # f = pi H(pi - theta), in pi's buffer. Masking with a bool tensor costs ~5x a float pass on CPU, so
            # H comes from threshold_backward (grad * (self > 0)), here and in backward.
            active = shifted > 0
            l0 = torch.count_nonzero(active).to(x.dtype) / x.shape[0]
            f = keep_where_positive(pre, shifted, out=pre)
            active = None if theta_positive else active
            band = None
            if ctx.needs_input_grad[3]:
                distance = shifted.abs_()  # |pi - theta|
                if sync_free:  # K(u) over the whole batch
                    band = ((distance < width).to(x.dtype) if kernel == "rectangle"
                            else (1.0 - distance / bandwidth).clamp_min_(0.0))
                else:
                    rows, cols = (distance < width).nonzero(as_tuple=True)
                    band = (rows, cols, 1.0 - distance[rows, cols] / bandwidth if kernel == "triangle" else None)
            fired, grad_buffer = None, workspace[1]
        x_hat = products.decode(f, W_dec, b_dec)
        ctx.save_for_backward(x, W_enc, theta, W_dec, f, active)
        ctx.band, ctx.workspace = band, grad_buffer
        ctx.mark_non_differentiable(f)
        return x_hat, f, l0, fired

    @staticmethod
    def backward(ctx: Any, g_xhat: Tensor | None, _g_f: Tensor | None, g_l0: Tensor | None, _g_fired: Tensor | None):
        if ctx.backend == "triton":
            return JumpReLUL0Function.triton_backward(ctx, g_xhat, g_l0)
        x, W_enc, theta, W_dec, f, active = ctx.saved_tensors
        batch, eps = f.shape[0], ctx.bandwidth
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 10
        products: DenseProducts = ctx.products
        g_f = products.decode_t(g_xhat, W_dec, out=ctx.workspace) if g_xhat is not None else None
        if need[3] and isinstance(ctx.band, Tensor):  # the dense window K(u) [B, m]
            per_entry = theta * g_f if g_f is not None else theta.new_zeros(())
            if g_l0 is not None:
                per_entry = per_entry + g_l0 / batch
            grads[3] = (ctx.band * per_entry).sum(0).to(theta.dtype) / -eps
        elif need[3]:
            rows, cols, weights = ctx.band
            per_entry = theta[cols] * g_f[rows, cols] if g_f is not None else theta.new_zeros(cols.shape)
            if g_l0 is not None:
                per_entry = per_entry + g_l0 / batch
            if weights is not None:
                per_entry = per_entry * weights
            grad_theta = torch.zeros_like(theta).index_add_(0, cols, per_entry.to(theta.dtype))
            grads[3] = grad_theta / -eps
        if g_f is None:
            return tuple(grads)
        if need[4]:
            grads[4] = products.decoder_grad(f, g_xhat)
        if need[5]:
            grads[5] = g_xhat.sum(0)
        if active is None:  # d f / d pi = H(pi - theta) = 1[f > 0] when theta > 0
            g_pre = keep_where_positive(g_f, f, out=g_f)
        else:
            g_pre = g_f.mul_(active)
        encoder_grads(grads, need, g_pre, x, W_enc, products)
        return tuple(grads)

    @staticmethod
    def triton_backward(ctx: Any, g_xhat: Tensor | None, g_l0: Tensor | None) -> tuple:
        """The same gradients from p (saved in place of the window): one Triton pass masks dL/df into dL/dp and
        reduces the threshold's STE gradient over the batch."""
        x, W_enc, theta, W_dec, f, pre = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 10
        products: DenseProducts = ctx.products
        g_f = products.decode_t(g_xhat, W_dec) if g_xhat is not None else None
        if need[4] and g_xhat is not None:  # before the kernel: f and g_xhat are read, not written, by it
            grads[4] = products.decoder_grad(f, g_xhat)
        grad_theta = dispatch.triton_kernels().jumprelu_backward(g_f, pre, theta, g_l0, ctx.bandwidth, ctx.kernel,
                                                                 need[3])
        if grad_theta is not None:
            grads[3] = grad_theta.to(theta.dtype)
        if g_f is None:
            return tuple(grads)
        if need[5]:
            grads[5] = g_xhat.sum(0)
        encoder_grads(grads, need, g_f, x, W_enc, products)
        return tuple(grads)
