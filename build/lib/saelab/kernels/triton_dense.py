"""The GPU's elementwise kernels between the matmuls of the ReLU, JumpReLU and Gated steps, in Triton: each one pass
over a [B, d_sae] matrix in tiles (triton_tiles.py) that reads and writes every byte once and never synchronises
with the host.

They mirror kernels/native.py's C++ kernels where the two can share a contract, and differ where the GPU wants
another one:

* the JumpReLU forward keeps the biased pre-activations p (in place) instead of the kernel window's entries:
  the backward recomputes the window from p in the same pass that masks dL/df, so no variable-length list
  (and no host synchronisation for its length) is ever made;
* counts, sums and firing masks stay on the device, where the C++ kernels return Python numbers.

Sums are accumulated in float32 whatever the tensors' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from saelab.kernels.triton_tiles import (
    BLOCK_COLS,
    BLOCK_ROWS,
    add_columns,
    add_scalar,
    column_partials,
    deterministic,
    reduce_partials,
    relu,
    scalar_partials,
    tile,
    tile_grid,
)

KERNEL_IDS = {"rectangle": 0, "triangle": 1}  # the JumpReLU STE kernels (saes/ste.py)


# -- ReLU ----------------------------------------------------------------------------------------------------------
@triton.jit
def _relu_forward(pre_ptr, bias_ptr, total_ptr, fired_ptr, n_rows, n_cols, EXACT: tl.constexpr,
                  BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = tile(n_rows, n_cols, BR, BC)
    p = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = relu(p + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    f = tl.where(mask, f, 0.0)
    tl.store(pre_ptr + offs, f.to(pre_ptr.dtype.element_ty), mask=mask)
    add_scalar(total_ptr, tl.sum(tl.sum(f, axis=1), axis=0), EXACT)
    tl.atomic_max(fired_ptr + cols, tl.max((f > 0).to(tl.int32), axis=0), mask=col_ok)


def relu_forward(pre: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """In place: pre <- ReLU(pre + bias). Returns (the sum of all entries, a float32 scalar: the L1 penalty before
    its 1/B; fired [m] bool). One pass where addmm's bias, relu_, the penalty's sum and the firing max take four."""
    exact = deterministic()
    total = scalar_partials(pre.shape, pre.device, exact)
    fired = torch.zeros(pre.shape[1], dtype=torch.int32, device=pre.device)
    _relu_forward[tile_grid(pre.shape)](pre, bias, total, fired, *pre.shape, EXACT=exact, BR=BLOCK_ROWS,
                                         BC=BLOCK_COLS)
    return reduce_partials(total), fired.bool()


# -- JumpReLU ------------------------------------------------------------------------------------------------------
@triton.jit
def _jumprelu_forward(pre_ptr, bias_ptr, theta_ptr, f_ptr, count_ptr, fired_ptr, n_rows, n_cols,
                      BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = tile(n_rows, n_cols, BR, BC)
    p = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    active = (p > theta) & mask
    # f = p H(p - theta); where p or theta is NaN neither p > theta nor p <= theta holds, and p - theta is NaN.
    f = tl.where(p > theta, p, tl.where(p <= theta, 0.0, p - theta))
    tl.store(pre_ptr + offs, p.to(pre_ptr.dtype.element_ty), mask=mask)
    tl.store(f_ptr + offs, f.to(f_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(count_ptr, tl.sum(tl.sum(active.to(tl.int32), axis=1), axis=0))  # integer: order-free
    # fired means f > 0 somewhere (the bookkeeping's definition): with theta <= 0, an active p can be <= 0.
    tl.atomic_max(fired_ptr + cols, tl.max((active & (p > 0)).to(tl.int32), axis=0), mask=col_ok)


def jumprelu_forward(pre: Tensor, bias: Tensor, theta: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """f = p 1[p > theta] for p = pre + bias, into out; pre becomes p (the backward reads it). Returns
    (the number of active entries, an int64 scalar; fired [m] bool: f > 0 on some row)."""
    count = torch.zeros((), dtype=torch.int32, device=pre.device)
    fired = torch.zeros(pre.shape[1], dtype=torch.int32, device=pre.device)
    _jumprelu_forward[tile_grid(pre.shape)](pre, bias, theta, out, count, fired, *pre.shape,
                                             BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return count.to(torch.int64), fired.bool()


@triton.jit
def _jumprelu_backward(g_ptr, pre_ptr, theta_ptr, g_l0_ptr, grad_theta_ptr, n_rows, n_cols, inv_batch, bandwidth,
                       KERNEL: tl.constexpr, HAS_G: tl.constexpr, HAS_L0: tl.constexpr, EXACT: tl.constexpr,
                       BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = tile(n_rows, n_cols, BR, BC)
    p = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    u = (p - theta[None, :]) / bandwidth
    if KERNEL == 0:
        window = tl.where(tl.abs(u) < 0.5, 1.0, 0.0)
    else:
        window = relu(1.0 - tl.abs(u))
    window = tl.where(mask, window, 0.0)
    per_entry = tl.zeros((BR, BC), dtype=tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        per_entry += theta[None, :] * g
        tl.store(g_ptr + offs, tl.where(p > theta[None, :], g, 0.0).to(g_ptr.dtype.element_ty), mask=mask)
    if HAS_L0:
        per_entry += tl.load(g_l0_ptr).to(tl.float32) * inv_batch
    add_columns(grad_theta_ptr, cols, -tl.sum(window * per_entry, axis=0) / bandwidth, col_ok, n_cols, EXACT)


def jumprelu_backward(g_f: Tensor | None, pre: Tensor, theta: Tensor, g_l0: Tensor | None, bandwidth: float,
                      kernel: str, need_theta: bool) -> Tensor | None:
    """In place over g_f (dL/df): g_f <- g_f 1[p > theta], dL/dp. Returns dL/dtheta (float32 [m]) =
    -sum_b K((p - theta)/eps)/eps (theta g_f + g_L0 / B) if need_theta (SPEC section 3's two STEs), else None."""
    if g_f is None and (g_l0 is None or not need_theta):
        return torch.zeros(pre.shape[1], dtype=torch.float32, device=pre.device) if need_theta else None
    exact = deterministic()
    grad_theta = column_partials(pre.shape, pre.device, exact)
    _jumprelu_backward[tile_grid(pre.shape)](
        g_f if g_f is not None else pre, pre, theta, g_l0 if g_l0 is not None else theta, grad_theta, *pre.shape,
        1.0 / pre.shape[0], float(bandwidth), KERNEL=KERNEL_IDS[kernel], HAS_G=g_f is not None,
        HAS_L0=g_l0 is not None and need_theta, EXACT=exact, BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return reduce_partials(grad_theta) if need_theta else None


# -- Gated ---------------------------------------------------------------------------------------------------------
@triton.jit
def _gated_forward(z_ptr, bias_gate_ptr, gain_ptr, mag_shift_ptr, gate_ptr, pi_mag_ptr, f_ptr, total_ptr, fired_ptr,
                   n_rows, n_cols, EXACT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = tile(n_rows, n_cols, BR, BC)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = relu(z + tl.load(bias_gate_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    gain = tl.load(gain_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    pi_mag = z * gain[None, :] + tl.load(mag_shift_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    f = tl.where(gate > 0, relu(pi_mag), gate)  # gate is 0 or NaN where it is not > 0
    gate = tl.where(mask, gate, 0.0)
    f = tl.where(mask, f, 0.0)
    tl.store(gate_ptr + offs, gate.to(gate_ptr.dtype.element_ty), mask=mask)
    tl.store(pi_mag_ptr + offs, pi_mag.to(pi_mag_ptr.dtype.element_ty), mask=mask)
    tl.store(f_ptr + offs, f.to(f_ptr.dtype.element_ty), mask=mask)
    add_scalar(total_ptr, tl.sum(tl.sum(gate, axis=1), axis=0), EXACT)
    tl.atomic_max(fired_ptr + cols, tl.max((f > 0).to(tl.int32), axis=0), mask=col_ok)


def gated_forward(z: Tensor, bias_gate: Tensor, gain: Tensor, mag_shift: Tensor, gate: Tensor, pi_mag: Tensor,
                  f: Tensor) -> tuple[Tensor, Tensor]:
    """native.gated_forward's contract: gate = ReLU(z + bias_gate), pi_mag = z gain + mag_shift,
    f = 1[gate > 0] ReLU(pi_mag) into the given buffers; returns (sum of gate, a float32 scalar; fired [m] bool)."""
    exact = deterministic()
    total = scalar_partials(z.shape, z.device, exact)
    fired = torch.zeros(z.shape[1], dtype=torch.int32, device=z.device)
    _gated_forward[tile_grid(z.shape)](z, bias_gate, gain, mag_shift, gate, pi_mag, f, total, fired, *z.shape,
                                        EXACT=exact, BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return reduce_partials(total), fired.bool()


@triton.jit
def _gated_backward_mag(g_ptr, f_ptr, pi_mag_ptr, gain_ptr, sum_g_ptr, sum_pg_ptr, n_rows, n_cols,
                        EXACT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = tile(n_rows, n_cols, BR, BC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pi_mag = tl.load(pi_mag_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gain = tl.load(gain_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.where(f > 0, g, 0.0)
    tl.store(g_ptr + offs, (g * gain[None, :]).to(g_ptr.dtype.element_ty), mask=mask)
    add_columns(sum_g_ptr, cols, tl.sum(g, axis=0), col_ok, n_cols, EXACT)
    add_columns(sum_pg_ptr, cols, tl.sum(g * pi_mag, axis=0), col_ok, n_cols, EXACT)


def gated_backward_mag(g: Tensor, f: Tensor, pi_mag: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """native.gated_backward_mag's contract: g <- g 1[f > 0] gain in place; returns the column sums of g 1[f > 0]
    and of pi_mag g 1[f > 0] (float32 [m])."""
    exact = deterministic()
    sum_g, sum_pg = column_partials(g.shape, g.device, exact), column_partials(g.shape, g.device, exact)
    _gated_backward_mag[tile_grid(g.shape)](g, f, pi_mag, gain, sum_g, sum_pg, *g.shape, EXACT=exact,
                                             BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return reduce_partials(sum_g), reduce_partials(sum_pg)


@triton.jit
def _gated_backward_gate(g_gate_ptr, gate_ptr, g_z_ptr, sums_ptr, n_rows, n_cols, EXACT: tl.constexpr,
                         BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = tile(n_rows, n_cols, BR, BC)
    g = tl.load(g_gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(gate > 0, g, 0.0)
    g_z = tl.load(g_z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_z_ptr + offs, (g_z + g).to(g_z_ptr.dtype.element_ty), mask=mask)
    add_columns(sums_ptr, cols, tl.sum(g, axis=0), col_ok, n_cols, EXACT)


def gated_backward_gate(g_gate: Tensor, gate: Tensor, g_z: Tensor) -> Tensor:
    """native.gated_backward_gate's contract: g_z += g_gate 1[gate > 0]; returns that term's column sums."""
    exact = deterministic()
    sums = column_partials(g_z.shape, g_z.device, exact)
    _gated_backward_gate[tile_grid(g_z.shape)](g_gate, gate, g_z, sums, *g_z.shape, EXACT=exact,
                                                BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return reduce_partials(sums)
