"""The training step's CPU kernels (sparse_kernels.cpp), one Python wrapper each, called through ctypes.

TopK/BatchTopK training is one encoder matmul, then selection and sparse products; torch's operators for the
latter (topk, embedding_bag, CSR products) cost more than the matmul budget allows on CPU. JumpReLU and Gated
steps are matmuls with elementwise work between them, which torch spreads over many passes of [B, d_sae]
tensors; jumprelu_forward and the gated_* kernels make it one pass each. The library is built and loaded by
native_library.py (library, usable, DISABLE_VARIABLE); the bf16 screen (Screen, bf16_screen, fast_bf16,
screened_row_topk, screened_batch_topk) is native_screen.py's. Both are re-exported here, so callers (and the
tests that watch them) name one module: `native.<kernel>`.

Every function returns None when the kernels do not apply (no compiler, SAELAB_NATIVE_KERNELS=0, tensors not
on the CPU, or not float32), and the caller then runs its torch twin; tests/test_native_kernels.py checks
each kernel against that twin.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from saelab.kernels.block_products import NO_SPAN, LayerSpan
from saelab.kernels.native_library import DISABLE_VARIABLE, library, pointer, threads, usable, usable_library
from saelab.kernels.native_screen import Screen, bf16_screen, fast_bf16, screened_batch_topk, screened_row_topk

__all__ = ["DISABLE_VARIABLE", "NO_SPAN", "LayerSpan", "Screen", "batch_topk", "bf16_screen", "fast_bf16",
           "gated_backward_gate", "gated_backward_mag", "gated_forward", "group_by", "jumprelu_forward", "library",
           "row_topk", "sampled_dot", "screened_batch_topk", "screened_row_topk", "sparse_decode", "sparse_t_dense",
           "usable"]


def _bias_ok(bias: Tensor | None, width: int) -> bool:
    return bias is None or (bias.dtype == torch.float32 and bias.shape == (width,) and usable_library(bias) is not None)


def row_topk(scores: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """(ids, values), each [rows, k]: every row's k largest of scores + bias (bias [width] or None; ties: lower
    index), in ascending column order. Adding the bias here spares the matmul a pass writing it."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.stride(1) != 1 or scores.device.type != "cpu":
        return None
    rows, width = scores.shape
    if not 0 < k <= width or not _bias_ok(bias, width) or (lib := library()) is None:
        return None
    ids = torch.empty(rows, k, dtype=torch.int64)
    values = torch.empty(rows, k, dtype=torch.float32)
    lib.saelab_row_topk(scores.data_ptr(), pointer(bias), rows, width, scores.stride(0), k, values.data_ptr(),
                        ids.data_ptr(), threads())
    return ids, values


def batch_topk(scores: Tensor, keep: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """(flat ids, values) of the `keep` largest entries of the [B, width] matrix scores + bias (ties: lower flat
    index), ids ascending (so grouped by row)."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or (lib := usable_library(scores)) is None:
        return None
    if not 0 < keep <= scores.numel() or not _bias_ok(bias, scores.shape[1]):
        return None
    ids = torch.empty(keep, dtype=torch.int64)
    values = torch.empty(keep, dtype=torch.float32)
    kept = lib.saelab_batch_topk(scores.data_ptr(), pointer(bias), scores.numel(), scores.shape[1], keep,
                                 ids.data_ptr(), values.data_ptr(), threads())
    return (ids, values) if kept == keep else None


def group_by(ids: Tensor, n_groups: int) -> tuple[Tensor, Tensor] | None:
    """(order, offsets [n_groups + 1]): a stable sort of entries by id (a counting sort)."""
    if (lib := usable_library(ids)) is None or ids.dtype != torch.int64:
        return None
    order = torch.empty_like(ids)
    offsets = torch.empty(n_groups + 1, dtype=torch.int64)
    lib.saelab_group_by(ids.data_ptr(), ids.numel(), n_groups, order.data_ptr(), offsets.data_ptr())
    return order, offsets


def sparse_decode(values: Tensor, cols: Tensor, row_offsets: Tensor, table: Tensor, bias: Tensor | None = None,
                  minus: Tensor | None = None, row_sq: bool = False,
                  span: LayerSpan | None = None) -> tuple[Tensor, Tensor | None] | None:
    """(out, ||out[r]||^2 per row if row_sq): out[r] = bias + sum over row r's entries of values[e] table[cols[e]]
    - minus[r], a [rows, d] tensor (bias [d] and minus [rows, d] optional). With a span, table's rows are read on
    their span alone (they must be zero elsewhere)."""
    extra = [t for t in (bias, minus) if t is not None]
    if any(t.dtype != torch.float32 for t in (values, table, *extra)):
        return None
    if (lib := usable_library(values, cols, row_offsets, table, *extra)) is None:
        return None
    rows, d = row_offsets.numel() - 1, table.shape[1]
    if (bias is not None and bias.shape != (d,)) or (minus is not None and minus.shape != (rows, d)):
        return None
    out = torch.empty(rows, d, dtype=torch.float32)
    sq = torch.empty(rows, dtype=torch.float32) if row_sq else None
    lib.saelab_sparse_decode(values.data_ptr(), cols.data_ptr(), row_offsets.data_ptr(), rows, table.data_ptr(), d,
                             pointer(bias), pointer(minus), out.data_ptr(), pointer(sq), *(span or NO_SPAN), threads())
    return out, sq


def sampled_dot(cols: Tensor, row_offsets: Tensor, table: Tensor, dense: Tensor,
                span: LayerSpan | None = None) -> Tensor | None:
    """out[e] = dense[row(e)] . table[cols[e]] for each entry e (rows given by row_offsets); with a span, summed
    over the span of table's row alone (it must be zero elsewhere)."""
    if table.dtype != torch.float32 or dense.dtype != torch.float32:
        return None
    if (lib := usable_library(cols, row_offsets, table, dense)) is None:
        return None
    out = torch.empty(cols.numel(), dtype=torch.float32)
    lib.saelab_sampled_dot(cols.data_ptr(), row_offsets.data_ptr(), row_offsets.numel() - 1, table.data_ptr(),
                           dense.data_ptr(), table.shape[1], out.data_ptr(), *(span or NO_SPAN), threads())
    return out


def sparse_t_dense(order: Tensor, col_offsets: Tensor, rows: Tensor, coef: Tensor, dense: Tensor,
                   transposed: bool = False, col_sums: bool = False,
                   shift: Tensor | None = None, span: LayerSpan | None = None) -> tuple[Tensor, Tensor | None] | None:
    """Z^T (dense - shift) ([n_cols, d], or its transpose [d, n_cols]) for the sparse Z with entries
    (rows[e], col, coef[e]) grouped by column (order, col_offsets); shift [d] is optional (none: zero). Also Z's
    column sums if col_sums. With a span, column c's row of the product is computed on c's span and is 0 elsewhere
    (where the weight it is the gradient of is a zero block)."""
    extra = [] if shift is None else [shift]
    if any(t.dtype != torch.float32 for t in (coef, dense, *extra)):
        return None
    if (lib := usable_library(order, col_offsets, rows, coef, dense, *extra)) is None:
        return None
    n_cols, d = col_offsets.numel() - 1, dense.shape[1]
    if shift is not None and shift.shape != (d,):
        return None
    out = torch.empty((d, n_cols) if transposed else (n_cols, d), dtype=torch.float32)
    sums = torch.empty(n_cols, dtype=torch.float32) if col_sums else None
    lib.saelab_sparse_t_dense(order.data_ptr(), col_offsets.data_ptr(), n_cols, rows.data_ptr(), coef.data_ptr(),
                              dense.data_ptr(), d, pointer(shift), out.data_ptr(), int(transposed), pointer(sums),
                              *(span or NO_SPAN), threads())
    return out, sums



def _matrices_and_vectors(matrices: tuple[Tensor, ...], vectors: tuple[Tensor, ...]) -> ctypes.CDLL | None:
    """The library, if the matrices are float32 [B, m] alike and the vectors float32 [m], all contiguous CPU."""
    shape = matrices[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in matrices) or any(v.shape != (shape[1],) for v in vectors):
        return None
    if any(t.dtype != torch.float32 for t in (*matrices, *vectors)):
        return None
    return usable_library(*matrices, *vectors)


def jumprelu_forward(pre: Tensor, bias: Tensor, theta: Tensor, width: float, weight_scale: float,
                     out: Tensor) -> tuple[int, Tensor, Tensor, Tensor, Tensor] | None:
    """JumpReLU's training forward in one pass over pre ([B, m], left as it was): f = p 1[p > theta] for
    p = pre + bias, written to out. Returns (active entries, fired [m] bool, and the entries with |p - theta| <
    width as rows, cols and 1 - |p - theta| / weight_scale, row-major)."""
    if (lib := _matrices_and_vectors((pre, out), (bias, theta))) is None:
        return None
    rows, m = pre.shape
    fired = torch.empty(m, dtype=torch.bool)
    band = ctypes.c_int64(0)
    capacity = max(4096, pre.numel() // 16)  # the window holds ~0.1-2% of the entries; retried if more
    while True:
        band_rows, band_cols = torch.empty(capacity, dtype=torch.int64), torch.empty(capacity, dtype=torch.int64)
        weights = torch.empty(capacity, dtype=torch.float32)
        active = lib.saelab_jumprelu_forward(pre.data_ptr(), out.data_ptr(), bias.data_ptr(), theta.data_ptr(), rows,
                                             m, width, weight_scale, band_rows.data_ptr(), band_cols.data_ptr(),
                                             weights.data_ptr(), capacity, ctypes.byref(band), fired.data_ptr(),
                                             threads())
        if band.value <= capacity:
            n = band.value
            return active, fired, band_rows[:n], band_cols[:n], weights[:n]
        capacity = band.value


def gated_forward(z: Tensor, bias_gate: Tensor, gain: Tensor, mag_shift: Tensor, gate: Tensor, pi_mag: Tensor,
                  f: Tensor) -> tuple[float, Tensor] | None:
    """The Gated SAE's forward after z = x W in one pass: gate = ReLU(z + bias_gate), pi_mag = z gain + mag_shift,
    f = 1[gate > 0] ReLU(pi_mag) into the given (distinct) buffers; returns (sum of gate, fired [m] bool)."""
    if (lib := _matrices_and_vectors((z, gate, pi_mag, f), (bias_gate, gain, mag_shift))) is None:
        return None
    fired = torch.empty(z.shape[1], dtype=torch.bool)
    total = lib.saelab_gated_forward(z.data_ptr(), bias_gate.data_ptr(), gain.data_ptr(), mag_shift.data_ptr(),
                                     *z.shape, gate.data_ptr(), pi_mag.data_ptr(), f.data_ptr(), fired.data_ptr(),
                                     threads())
    return total, fired


def gated_backward_mag(g: Tensor, f: Tensor, pi_mag: Tensor, gain: Tensor) -> tuple[Tensor, Tensor] | None:
    """In place over g (dL/df): g <- g 1[f > 0] gain; returns the column sums of g 1[f > 0] and of pi_mag g 1[f > 0]."""
    if (lib := _matrices_and_vectors((g, f, pi_mag), (gain,))) is None:
        return None
    sum_g, sum_pg = torch.empty(g.shape[1]), torch.empty(g.shape[1])
    lib.saelab_gated_backward_mag(g.data_ptr(), f.data_ptr(), pi_mag.data_ptr(), gain.data_ptr(), *g.shape,
                                  sum_g.data_ptr(), sum_pg.data_ptr(), threads())
    return sum_g, sum_pg


def gated_backward_gate(g_gate: Tensor, gate: Tensor, g_z: Tensor) -> Tensor | None:
    """g_z += g_gate 1[gate > 0]; returns that term's column sums."""
    if (lib := _matrices_and_vectors((g_gate, gate, g_z), ())) is None:
        return None
    sums = torch.empty(g_z.shape[1])
    lib.saelab_gated_backward_gate(g_gate.data_ptr(), gate.data_ptr(), g_z.data_ptr(), *g_z.shape, sums.data_ptr(),
                                   threads())
    return sums
