"""The GPU's sparse products of a TopK/BatchTopK step, in Triton: the decoder of a sparse Z (with its bias, a
subtracted target and the rows' squared norms), a dense product sampled at Z's entries, and Z^T times a dense
matrix. Each one pass that never synchronises with the host; they keep kernels/native.py's C++ contracts.

Sums are accumulated in float32 whatever the tensors' dtype; sparse_t_dense's are in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from saelab.kernels.triton_tiles import BLOCK_D, BLOCK_ENTRIES, deterministic, grid, reduce_partials


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
    return out, (reduce_partials(sq) if sq is not None else None)


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
