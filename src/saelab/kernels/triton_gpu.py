"""The training step's GPU kernels, in Triton: the elementwise work between the matmuls and the sparse products
of TopK/BatchTopK, each one pass that reads and writes every byte once and never synchronises with the host.

They mirror kernels/native.py (the CPU's C++ kernels) where the two can share a contract, and differ where the
GPU wants another one:

* the JumpReLU forward keeps the biased pre-activations p (in place) instead of the kernel window's entries:
  the backward recomputes the window from p in the same pass that masks dL/df, so no variable-length list
  (and no host synchronisation for its length) is ever made;
* counts, sums and firing masks stay on the device, where the C++ kernels return Python numbers.

Safe at every shape the step accepts (tests/test_triton_kernels.py checks each rule on the compiled kernels):

* offsets are 64-bit: every index is widened to int64 before it is multiplied by a row length, so
  B x d_sae or d_sae x d_in above 2^31 addresses the right element;
* the wide dimension (d_sae, tokens, latents) is on grid axis 0 (2^31 - 1 programs); axes 1 and 2 stop at 65,535;
* NaN stays NaN: ReLU and the threshold are written so that an unordered comparison yields NaN (tl.maximum and
  `p > theta` alone would turn it into 0 and hide it from the deferred finite check);
* under torch.use_deterministic_algorithms (trainer.deterministic=true) float sums are written per program and
  reduced by torch in a fixed order; otherwise they are float atomics (faster, order-dependent in the last bits).

Every kernel also runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is
first imported), which is how tests/test_triton_kernels.py checks them against the torch reference in CI.
Sums are accumulated in float32 whatever the tensors' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 32  # rows of a [B, d_sae] tile per program (the column sums reduce over these first)
BLOCK_COLS = 128  # columns of a tile: one 512-byte float32 row segment per warp-wide load
BLOCK_D = 128  # the dense dimension (d_in or d_out) handled per program in the sparse kernels
BLOCK_ENTRIES = 32  # sparse entries gathered at once (sampled_dot, and each step of the sparse products' loops)
KERNEL_IDS = {"rectangle": 0, "triangle": 1}  # the JumpReLU STE kernels (saes/ste.py)
MAX_GRID_YZ = 65_535  # CUDA's limit on grid axes 1 and 2 (axis 0 takes 2^31 - 1)


def deterministic() -> bool:
    """Whether float sums must not depend on scheduling (torch.use_deterministic_algorithms, which Lightning's
    trainer.deterministic=true turns on)."""
    return torch.are_deterministic_algorithms_enabled()


def grid(axis0: int, axis1: int = 1) -> tuple[int, int]:
    """A launch grid, refused by name where CUDA would refuse it (no launch, or a launch that covers too little)."""
    if axis1 > MAX_GRID_YZ:
        raise ValueError(f"Triton grid axis 1 = {axis1} exceeds CUDA's {MAX_GRID_YZ}: put the wide axis first")
    return axis0, axis1


def _tile_grid(shape: torch.Size) -> tuple[int, int]:
    """[B, d_sae] tiles: column blocks on axis 0 (d_sae up to 2^38), row blocks on axis 1 (B up to ~2M)."""
    return grid(triton.cdiv(shape[1], BLOCK_COLS), triton.cdiv(shape[0], BLOCK_ROWS))


def _column_partials(shape: torch.Size, device: torch.device, exact: bool) -> Tensor:
    """Where a tile kernel adds its column sums: one row per row block (reduced by torch in a fixed order) when
    the run must be deterministic, else one row that every program adds to atomically."""
    return torch.zeros(triton.cdiv(shape[0], BLOCK_ROWS) if exact else 1, shape[1], dtype=torch.float32,
                       device=device)


def _scalar_partials(shape: torch.Size, device: torch.device, exact: bool) -> Tensor:
    """A tile kernel's scalar float sum: one slot per program when deterministic, else one atomic slot."""
    n = triton.cdiv(shape[0], BLOCK_ROWS) * triton.cdiv(shape[1], BLOCK_COLS) if exact else 1
    return torch.zeros(n, dtype=torch.float32, device=device)


@triton.jit
def _tile(n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """This program's tile: rows, columns (int64: rows * n_cols can pass 2^31), flat offsets, masks."""
    rows = tl.program_id(1).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(0).to(tl.int64) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows, cols, rows[:, None] * n_cols + cols[None, :], mask, cols < n_cols


@triton.jit
def _add_columns(ptr, cols, values, col_ok, n_cols, EXACT: tl.constexpr):
    """Column sums of a tile into _column_partials' buffer: this row block's own row, or atomically."""
    if EXACT:
        tl.store(ptr + tl.program_id(1).to(tl.int64) * n_cols + cols, values, mask=col_ok)
    else:
        tl.atomic_add(ptr + cols, values, mask=col_ok)


@triton.jit
def _add_scalar(ptr, value, EXACT: tl.constexpr):
    """A tile's scalar sum into _scalar_partials' buffer: this program's slot, or atomically."""
    if EXACT:
        tl.store(ptr + (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)), value)
    else:
        tl.atomic_add(ptr, value)


@triton.jit
def _relu(x):
    """max(x, 0) that keeps NaN (tl.maximum returns the other operand, as fmax does)."""
    return tl.where(x <= 0.0, 0.0, x)


# -- ReLU ----------------------------------------------------------------------------------------------------------
@triton.jit
def _relu_forward(pre_ptr, bias_ptr, total_ptr, fired_ptr, n_rows, n_cols, EXACT: tl.constexpr,
                  BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = _tile(n_rows, n_cols, BR, BC)
    p = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = _relu(p + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    f = tl.where(mask, f, 0.0)
    tl.store(pre_ptr + offs, f.to(pre_ptr.dtype.element_ty), mask=mask)
    _add_scalar(total_ptr, tl.sum(tl.sum(f, axis=1), axis=0), EXACT)
    tl.atomic_max(fired_ptr + cols, tl.max((f > 0).to(tl.int32), axis=0), mask=col_ok)


def relu_forward(pre: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """In place: pre <- ReLU(pre + bias). Returns (the sum of all entries, a float32 scalar: the L1 penalty before
    its 1/B; fired [m] bool). One pass where addmm's bias, relu_, the penalty's sum and the firing max take four."""
    exact = deterministic()
    total = _scalar_partials(pre.shape, pre.device, exact)
    fired = torch.zeros(pre.shape[1], dtype=torch.int32, device=pre.device)
    _relu_forward[_tile_grid(pre.shape)](pre, bias, total, fired, *pre.shape, EXACT=exact, BR=BLOCK_ROWS,
                                         BC=BLOCK_COLS)
    return _reduce(total), fired.bool()


# -- JumpReLU ------------------------------------------------------------------------------------------------------
@triton.jit
def _jumprelu_forward(pre_ptr, bias_ptr, theta_ptr, f_ptr, count_ptr, fired_ptr, n_rows, n_cols,
                      BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = _tile(n_rows, n_cols, BR, BC)
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
    _jumprelu_forward[_tile_grid(pre.shape)](pre, bias, theta, out, count, fired, *pre.shape,
                                             BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return count.to(torch.int64), fired.bool()


@triton.jit
def _jumprelu_backward(g_ptr, pre_ptr, theta_ptr, g_l0_ptr, grad_theta_ptr, n_rows, n_cols, inv_batch, bandwidth,
                       KERNEL: tl.constexpr, HAS_G: tl.constexpr, HAS_L0: tl.constexpr, EXACT: tl.constexpr,
                       BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = _tile(n_rows, n_cols, BR, BC)
    p = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    u = (p - theta[None, :]) / bandwidth
    if KERNEL == 0:
        window = tl.where(tl.abs(u) < 0.5, 1.0, 0.0)
    else:
        window = _relu(1.0 - tl.abs(u))
    window = tl.where(mask, window, 0.0)
    per_entry = tl.zeros((BR, BC), dtype=tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        per_entry += theta[None, :] * g
        tl.store(g_ptr + offs, tl.where(p > theta[None, :], g, 0.0).to(g_ptr.dtype.element_ty), mask=mask)
    if HAS_L0:
        per_entry += tl.load(g_l0_ptr).to(tl.float32) * inv_batch
    _add_columns(grad_theta_ptr, cols, -tl.sum(window * per_entry, axis=0) / bandwidth, col_ok, n_cols, EXACT)


def jumprelu_backward(g_f: Tensor | None, pre: Tensor, theta: Tensor, g_l0: Tensor | None, bandwidth: float,
                      kernel: str, need_theta: bool) -> Tensor | None:
    """In place over g_f (dL/df): g_f <- g_f 1[p > theta], dL/dp. Returns dL/dtheta (float32 [m]) =
    -sum_b K((p - theta)/eps)/eps (theta g_f + g_L0 / B) if need_theta (SPEC section 3's two STEs), else None."""
    if g_f is None and (g_l0 is None or not need_theta):
        return torch.zeros(pre.shape[1], dtype=torch.float32, device=pre.device) if need_theta else None
    exact = deterministic()
    grad_theta = _column_partials(pre.shape, pre.device, exact)
    _jumprelu_backward[_tile_grid(pre.shape)](
        g_f if g_f is not None else pre, pre, theta, g_l0 if g_l0 is not None else theta, grad_theta, *pre.shape,
        1.0 / pre.shape[0], float(bandwidth), KERNEL=KERNEL_IDS[kernel], HAS_G=g_f is not None,
        HAS_L0=g_l0 is not None and need_theta, EXACT=exact, BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return _reduce(grad_theta) if need_theta else None


# -- Gated ---------------------------------------------------------------------------------------------------------
@triton.jit
def _gated_forward(z_ptr, bias_gate_ptr, gain_ptr, mag_shift_ptr, gate_ptr, pi_mag_ptr, f_ptr, total_ptr, fired_ptr,
                   n_rows, n_cols, EXACT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = _tile(n_rows, n_cols, BR, BC)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = _relu(z + tl.load(bias_gate_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    gain = tl.load(gain_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    pi_mag = z * gain[None, :] + tl.load(mag_shift_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    f = tl.where(gate > 0, _relu(pi_mag), gate)  # gate is 0 or NaN where it is not > 0
    gate = tl.where(mask, gate, 0.0)
    f = tl.where(mask, f, 0.0)
    tl.store(gate_ptr + offs, gate.to(gate_ptr.dtype.element_ty), mask=mask)
    tl.store(pi_mag_ptr + offs, pi_mag.to(pi_mag_ptr.dtype.element_ty), mask=mask)
    tl.store(f_ptr + offs, f.to(f_ptr.dtype.element_ty), mask=mask)
    _add_scalar(total_ptr, tl.sum(tl.sum(gate, axis=1), axis=0), EXACT)
    tl.atomic_max(fired_ptr + cols, tl.max((f > 0).to(tl.int32), axis=0), mask=col_ok)


def gated_forward(z: Tensor, bias_gate: Tensor, gain: Tensor, mag_shift: Tensor, gate: Tensor, pi_mag: Tensor,
                  f: Tensor) -> tuple[Tensor, Tensor]:
    """native.gated_forward's contract: gate = ReLU(z + bias_gate), pi_mag = z gain + mag_shift,
    f = 1[gate > 0] ReLU(pi_mag) into the given buffers; returns (sum of gate, a float32 scalar; fired [m] bool)."""
    exact = deterministic()
    total = _scalar_partials(z.shape, z.device, exact)
    fired = torch.zeros(z.shape[1], dtype=torch.int32, device=z.device)
    _gated_forward[_tile_grid(z.shape)](z, bias_gate, gain, mag_shift, gate, pi_mag, f, total, fired, *z.shape,
                                        EXACT=exact, BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return _reduce(total), fired.bool()


@triton.jit
def _gated_backward_mag(g_ptr, f_ptr, pi_mag_ptr, gain_ptr, sum_g_ptr, sum_pg_ptr, n_rows, n_cols,
                        EXACT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = _tile(n_rows, n_cols, BR, BC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pi_mag = tl.load(pi_mag_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gain = tl.load(gain_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.where(f > 0, g, 0.0)
    tl.store(g_ptr + offs, (g * gain[None, :]).to(g_ptr.dtype.element_ty), mask=mask)
    _add_columns(sum_g_ptr, cols, tl.sum(g, axis=0), col_ok, n_cols, EXACT)
    _add_columns(sum_pg_ptr, cols, tl.sum(g * pi_mag, axis=0), col_ok, n_cols, EXACT)


def gated_backward_mag(g: Tensor, f: Tensor, pi_mag: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """native.gated_backward_mag's contract: g <- g 1[f > 0] gain in place; returns the column sums of g 1[f > 0]
    and of pi_mag g 1[f > 0] (float32 [m])."""
    exact = deterministic()
    sum_g, sum_pg = _column_partials(g.shape, g.device, exact), _column_partials(g.shape, g.device, exact)
    _gated_backward_mag[_tile_grid(g.shape)](g, f, pi_mag, gain, sum_g, sum_pg, *g.shape, EXACT=exact,
                                             BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return _reduce(sum_g), _reduce(sum_pg)


@triton.jit
def _gated_backward_gate(g_gate_ptr, gate_ptr, g_z_ptr, sums_ptr, n_rows, n_cols, EXACT: tl.constexpr,
                         BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, offs, mask, col_ok = _tile(n_rows, n_cols, BR, BC)
    g = tl.load(g_gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(gate > 0, g, 0.0)
    g_z = tl.load(g_z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_z_ptr + offs, (g_z + g).to(g_z_ptr.dtype.element_ty), mask=mask)
    _add_columns(sums_ptr, cols, tl.sum(g, axis=0), col_ok, n_cols, EXACT)


def gated_backward_gate(g_gate: Tensor, gate: Tensor, g_z: Tensor) -> Tensor:
    """native.gated_backward_gate's contract: g_z += g_gate 1[gate > 0]; returns that term's column sums."""
    exact = deterministic()
    sums = _column_partials(g_z.shape, g_z.device, exact)
    _gated_backward_gate[_tile_grid(g_z.shape)](g_gate, gate, g_z, sums, *g_z.shape, EXACT=exact,
                                                BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return _reduce(sums)


# -- the sparse products of TopK / BatchTopK -----------------------------------------------------------------------
@triton.jit
def _sparse_decode(values_ptr, cols_ptr, row_offsets_ptr, table_ptr, bias_ptr, minus_ptr, out_ptr, row_sq_ptr,
                   width, HAS_BIAS: tl.constexpr, HAS_MINUS: tl.constexpr, ROW_SQ: tl.constexpr, EXACT: tl.constexpr,
                   BE: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)
    d_ok = d < width
    acc = tl.zeros((BD,), dtype=tl.float32)
    start = tl.load(row_offsets_ptr + row)
    stop = tl.load(row_offsets_ptr + (row + 1))
    for j0 in range(start, stop, BE):  # BE of the row's entries per step: independent loads, one [BE, BD] block
        j = j0 + tl.arange(0, BE)
        ok = j < stop
        latent = tl.load(cols_ptr + j, mask=ok, other=0).to(tl.int64)
        value = tl.load(values_ptr + j, mask=ok, other=0.0).to(tl.float32)
        block = tl.load(table_ptr + latent[:, None] * width + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(value[:, None] * block.to(tl.float32), axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_MINUS:
        acc -= tl.load(minus_ptr + row * width + d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    if ROW_SQ:
        acc = tl.where(d_ok, acc, 0.0)
        if EXACT:  # one slot per (block of n, row), summed by torch
            tl.store(row_sq_ptr + tl.program_id(1).to(tl.int64) * tl.num_programs(0) + row, tl.sum(acc * acc, axis=0))
        else:
            tl.atomic_add(row_sq_ptr + row, tl.sum(acc * acc, axis=0))


def sparse_decode(values: Tensor, cols: Tensor, row_offsets: Tensor, table: Tensor, bias: Tensor | None = None,
                  minus: Tensor | None = None, row_sq: bool = False) -> tuple[Tensor, Tensor | None]:
    """native.sparse_decode's contract: (Z table + bias - minus [B, n]; its rows' squared norms if row_sq) for Z
    the sparse [B, d_sae] matrix of entries (row, cols[j], values[j]), rows given by CSR row_offsets [B + 1]."""
    batch, width = row_offsets.shape[0] - 1, table.shape[1]
    exact = row_sq and deterministic()
    launch = grid(batch, triton.cdiv(width, BLOCK_D))
    out = torch.empty(batch, width, dtype=table.dtype, device=table.device)
    sq = torch.zeros(launch[1] if exact else 1, batch, dtype=torch.float32, device=table.device) if row_sq else None
    table = table.contiguous()
    unused = table  # a placeholder pointer for the optional operands (the constexpr flags skip their loads)
    _sparse_decode[launch](
        values, cols, row_offsets, table, bias if bias is not None else unused,
        minus.contiguous() if minus is not None else unused, out, sq if sq is not None else unused, width,
        HAS_BIAS=bias is not None, HAS_MINUS=minus is not None, ROW_SQ=row_sq, EXACT=exact, BE=BLOCK_ENTRIES,
        BD=BLOCK_D)
    return out, (_reduce(sq) if sq is not None else None)


@triton.jit
def _sampled_dot(rows_ptr, cols_ptr, table_ptr, dense_ptr, out_ptr, n_entries, width,
                 BE: tl.constexpr, BD: tl.constexpr):
    entries = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)
    ok = entries < n_entries
    rows = tl.load(rows_ptr + entries, mask=ok, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + entries, mask=ok, other=0).to(tl.int64)
    acc = tl.zeros((BE,), dtype=tl.float32)
    for d0 in range(0, width, BD):
        d = d0 + tl.arange(0, BD).to(tl.int64)
        m = ok[:, None] & (d[None, :] < width)
        a = tl.load(table_ptr + cols[:, None] * width + d[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(dense_ptr + rows[:, None] * width + d[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + entries, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sampled_dot(rows: Tensor, cols: Tensor, table: Tensor, dense: Tensor) -> Tensor:
    """table[cols[j]] . dense[rows[j]] for every entry j: table [d_sae, n], dense [B, n]."""
    n_entries, width = cols.shape[0], table.shape[1]
    out = torch.empty(n_entries, dtype=table.dtype, device=table.device)
    _sampled_dot[grid(triton.cdiv(n_entries, BLOCK_ENTRIES))](rows, cols, table.contiguous(), dense.contiguous(),
                                                              out, n_entries, width, BE=BLOCK_ENTRIES, BD=BLOCK_D)
    return out


@triton.jit
def _sparse_t_dense(order_ptr, col_offsets_ptr, rows_ptr, coef_ptr, dense_ptr, shift_ptr, out_ptr, sums_ptr, width,
                    out_row_stride, out_col_stride, HAS_SHIFT: tl.constexpr, SUMS: tl.constexpr, BE: tl.constexpr,
                    BD: tl.constexpr):
    latent = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)
    d_ok = d < width
    acc = tl.zeros((BD,), dtype=tl.float32)
    total = tl.zeros((BE,), dtype=tl.float32)
    start = tl.load(col_offsets_ptr + latent)
    stop = tl.load(col_offsets_ptr + (latent + 1))
    for e0 in range(start, stop, BE):  # BE of the latent's entries per step: gathered rows, not a chain of loads
        e = e0 + tl.arange(0, BE)
        ok = e < stop
        j = tl.load(order_ptr + e, mask=ok, other=0).to(tl.int64)
        row = tl.load(rows_ptr + j, mask=ok, other=0).to(tl.int64)
        c = tl.load(coef_ptr + j, mask=ok, other=0.0).to(tl.float32)
        block = tl.load(dense_ptr + row[:, None] * width + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(c[:, None] * block.to(tl.float32), axis=0)
        total += c
    latent_sum = tl.sum(total, axis=0)
    if HAS_SHIFT:
        acc -= latent_sum * tl.load(shift_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + latent * out_row_stride + d * out_col_stride, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    if SUMS:  # the first block of n writes the latent's sum
        tl.store(sums_ptr + latent, latent_sum.to(sums_ptr.dtype.element_ty), mask=tl.program_id(1) == 0)


def sparse_t_dense(order: Tensor, col_offsets: Tensor, rows: Tensor, coef: Tensor, dense: Tensor,
                   transposed: bool = False, with_sums: bool = False, shift: Tensor | None = None
                   ) -> tuple[Tensor, Tensor | None]:
    """native.sparse_t_dense's contract: (Z^T (dense - shift), [d_sae, n] or, if transposed, [n, d_sae]; Z's column
    sums if with_sums), entries grouped by latent through `order` and CSR col_offsets [d_sae + 1]. One program per
    (latent, block of n) sums its latent's entries in a fixed order: deterministic, no atomics."""
    n_latents, width = col_offsets.shape[0] - 1, dense.shape[1]
    out = torch.empty((width, n_latents) if transposed else (n_latents, width), dtype=dense.dtype, device=dense.device)
    strides = (1, n_latents) if transposed else (width, 1)
    sums = torch.empty(n_latents, dtype=coef.dtype, device=coef.device) if with_sums else None
    _sparse_t_dense[grid(n_latents, triton.cdiv(width, BLOCK_D))](
        order, col_offsets, rows, coef, dense.contiguous(), shift if shift is not None else dense, out,
        sums if sums is not None else coef, width, *strides, HAS_SHIFT=shift is not None, SUMS=with_sums,
        BE=BLOCK_ENTRIES, BD=BLOCK_D)
    return out, sums


def _reduce(partials: Tensor) -> Tensor:
    """Partial sums along dim 0 (a fixed-order torch reduction), or the one atomic row as it is."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(0)
