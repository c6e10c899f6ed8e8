"""The Gated SAE's fused training kernel: one encoder matmul for both paths, the gate's and the magnitude's
elementwise work between the matmuls, and both paths' latent gradients summed before the one dW matmul.

As in fused_relu.py (whose docstring gives the common design: folded biases, in-place passes, one reused
gradient buffer), it computes exactly the quantities of the plain PyTorch code (tests/test_step_equivalence.py).
The elementwise passes run where kernels/dispatch.py says: kernels/native.py's C++ on the CPU, the Triton
launchers of kernels/triton_gpu.py on CUDA, torch operators otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saelab.kernels import dispatch, native
from saelab.kernels.dense_grads import keep_where_positive


class GatedFunction(torch.autograd.Function):
    """The Gated SAE's training forward (heaviside gate, tied encoder, l1 sparsity, decoder frozen in the
    gate's terms): returns (x_hat, f, ||ReLU(pi_gate)||_1 / B, aux_hat or None, fired).

        z = x W + shift_mag           pi_gate = x W + bias_gate      pi_mag = exp(r) z + b_mag
        f = H(pi_gate) ReLU(pi_mag)   x_hat = f W_dec + b_dec        aux_hat = ReLU(pi_gate) sg(W_dec) + sg(b_dec)

    The caller folds the centring into the biases: bias_gate = b_gate - sg(b_dec) W and shift_mag = -b_dec W,
    so b_dec's centring gradient reaches it only through the magnitude path, as GatedSAE.preacts arranges.
    One encoder matmul serves both paths, and the backward pass sums both paths' latent gradients before the
    one dW matmul. On the CPU in float32 the elementwise work between the matmuls is three native passes
    (native.gated_forward, gated_backward_mag, gated_backward_gate), which also give the firing mask ([d_sae]
    bool; None on the torch path) and the column sums; torch operators compute the same in ~12 passes.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, bias_gate: Tensor, shift_mag: Tensor, r_mag: Tensor,
                b_mag: Tensor, W_dec: Tensor, b_dec: Tensor, aux: bool,
                workspace: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        ws_z, ws_gate, ws_f, ws_mag, ws_grad_gate = workspace
        z = torch.mm(x, W_enc, out=ws_z)
        gain = r_mag.exp()
        mag_shift = shift_mag * gain + b_mag
        ctx.backend = backend = dispatch.backend_for(x, W_enc, bias_gate, W_dec)
        found = None
        if backend == "triton":
            found = dispatch.triton_kernels().gated_forward(z, bias_gate, gain, mag_shift, gate=ws_gate, pi_mag=ws_mag,
                                                            f=ws_f)
        elif backend == "native":
            found = native.gated_forward(z, bias_gate, gain, mag_shift, gate=ws_gate, pi_mag=ws_mag, f=ws_f)
        if found is not None:  # z is spent: backward's dL/df goes to its buffer
            total, fired = found
            gate, pi_mag, f, grad_mag_buffer = ws_gate, ws_mag, ws_f, ws_z
            penalty = (total.to(x.dtype) if isinstance(total, Tensor) else x.new_tensor(total)) / x.shape[0]
        else:
            gate = torch.add(z, bias_gate, out=ws_gate).relu_()  # ReLU(pi_gate); pi_gate > 0 <=> gate > 0
            pi_mag = torch.addcmul(mag_shift, z, gain, out=z)  # (z + shift) exp(r) + b_mag, one pass
            f = keep_where_positive(pi_mag, gate, out=ws_f).relu_()  # H(pi_gate) ReLU(pi_mag)
            penalty = gate.sum(-1).mean()
            fired, grad_mag_buffer = None, ws_mag
        x_hat = torch.addmm(b_dec, f, W_dec)
        aux_hat = torch.addmm(b_dec, gate, W_dec) if aux else None
        ctx.save_for_backward(x, W_enc, gain, b_mag, W_dec, pi_mag, f, gate)
        ctx.workspace = (grad_mag_buffer, ws_grad_gate)
        ctx.mark_non_differentiable(f)
        ctx.set_materialize_grads(False)
        return x_hat, f, penalty, aux_hat, fired

    @staticmethod
    def backward(ctx: Any, g_xhat: Tensor | None, _g_f: Tensor | None, g_pen: Tensor | None,
                 g_aux: Tensor | None, _g_fired: Tensor | None):
        x, W_enc, gain, b_mag, W_dec, pi_mag, f, gate = ctx.saved_tensors
        batch = f.shape[0]
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 10
        ws_mag, ws_gate = ctx.workspace
        g_z = None
        if g_xhat is not None:  # magnitude path: dL/dpi_mag = g_f H ReLU'(pi_mag) = g_f 1[f > 0]
            g_mag = torch.mm(g_xhat, W_dec.t(), out=ws_mag)
            if need[6]:
                grads[6] = f.t() @ g_xhat
            if need[7]:
                grads[7] = g_xhat.sum(0)
            sums = _gated_backward_mag(ctx.backend, g_mag, f, pi_mag, gain)  # g_mag becomes dL/dz
            if sums is not None:
                grads_mag_sum, pi_mag_grad_sum = sums
                g_z = g_mag
            else:
                keep_where_positive(g_mag, f, out=g_mag)
                grads_mag_sum = g_mag.sum(0)
                pi_mag_grad_sum = torch.mul(pi_mag, g_mag, out=ws_gate).sum(0) if need[4] else None
                g_z = g_mag.mul_(gain)
            if need[5]:
                grads[5] = grads_mag_sum
            if need[4]:  # d pi_mag / d r = exp(r) z = pi_mag - b_mag
                # sum_b (pi_mag - b_mag) g_mag = sum_b pi_mag g_mag - b_mag sum_b g_mag
                grads[4] = pi_mag_grad_sum - b_mag * grads_mag_sum
            if need[3]:
                grads[3] = grads_mag_sum * gain  # = g_z.sum(0), without another pass
        if g_pen is not None or g_aux is not None:  # gate path: (lambda / B + g_aux sg(W_dec)^T) ReLU'(pi_gate)
            pen = (g_pen / batch).to(gate.dtype) if g_pen is not None else gate.new_zeros(())
            if g_aux is not None:
                g_gate = torch.addmm(pen, g_aux, W_dec.t(), out=ws_gate)
            else:
                g_gate = ws_gate.copy_(pen.expand_as(ws_gate))
            sums = _gated_backward_gate(ctx.backend, g_gate, gate, g_z) if g_z is not None else None  # g_z += masked
            if sums is None:
                keep_where_positive(g_gate, gate, out=g_gate)
                sums = g_gate.sum(0) if need[2] else None
                g_z = g_gate if g_z is None else g_z.add_(g_gate)
            if need[2]:
                grads[2] = sums
        if g_z is not None:
            if need[0]:
                grads[0] = g_z @ W_enc.t()
            if need[1]:
                grads[1] = x.t() @ g_z
        return tuple(grads)


def _gated_backward_mag(backend: str, *args: Tensor) -> tuple[Tensor, Tensor] | None:
    """gated_backward_mag of this backend's kernels; None on the torch backend (or where native declines)."""
    if backend == "triton":
        return dispatch.triton_kernels().gated_backward_mag(*args)
    return native.gated_backward_mag(*args) if backend == "native" else None


def _gated_backward_gate(backend: str, *args: Tensor) -> Tensor | None:
    """gated_backward_gate of this backend's kernels; None on the torch backend (or where native declines)."""
    if backend == "triton":
        return dispatch.triton_kernels().gated_backward_gate(*args)
    return native.gated_backward_gate(*args) if backend == "native" else None
