"""The bf16 screen of TopK/BatchTopK selection on CPUs with bf16 dot products (sparse_kernels.cpp through
native_library.py): the encoder matmul runs in bf16, and a proven error bound (Screen) limits the exact float32
work to the entries that could still be selected, so screened_row_topk and screened_batch_topk return exactly
what native.row_topk and native.batch_topk would on the float32 pre-activations.

Every function returns None when the screen does not apply (no kernels, tensors not float32 on the CPU, norms so
large the bound could overflow, or a batch-wide cutoff that failed), and the caller then runs the float32 path;
tests/test_native_kernels.py checks each against it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.kernels.native_library import cpu_flags, library, threads, usable_library

BF16_UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits, rounded to nearest)
F32_UNIT = 2.0**-24


@functools.cache
def fast_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX), where torch's bf16 matmul
    runs ~2.6x faster than float32 (24 vs 63 ms for [4096, 384] x [384, 3072] here); without them it is slower.
    Asked every TopK step, so /proc/cpuinfo is read once."""
    flags = cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class Screen:
    """A bfloat16 stand-in for the pre-activations x W + bias, with what exact selection needs besides.

    approx = bf16(xb Wb) for xb = bf16(x), Wb = bf16(W) (torch's bf16 matmul accumulates in float32). With
    dx = x - xb and dw_j = w_j - Wb[:, j] (measured, not assumed), every entry obeys
        |x.w_j + bias_j - (approx + bias_j)| <= row_a |w_j| + row_b |dw_j| + REL_APPROX |approx| + REL_BIAS |bias_j|,
        row_a = 1.01 (|dx| + 3 gamma (1 + u)^2 |x|),   row_b = 1.01 (|x| + |dx|):
    xb.wb - x.w = -dx.w - x.dw + dx.dw, so Cauchy-Schwarz bounds it by |dx| |w| + (|x| + |dx|) |dw|; float32 sums
    of d terms, in any order, err by at most gamma = d u32 / (1 - d u32) times the sum of |terms|, itself at most
    (1 + u)^2 |x| |w| (u = 2^-8, bf16's unit roundoff), counted three times (the bf16 matmul's sum, the float32
    value it stands in for, the kernel's exact dot); rounding the output to bf16 moves it by at most
    u / (1 - u) |approx|. 1% on top covers the norms' own rounding, REL_BIAS the float32 additions of the bias.
    Measured rounding errors average ~0.4 u |x| where the worst case is u |x|, so the band is ~2.4x narrower
    than a bound from u alone.
    """

    approx: Tensor  # [B, m] bfloat16
    x: Tensor  # [B, d] float32
    wt: Tensor  # [m, d] float32: W^T, so each exact value reads one contiguous row
    bias: Tensor  # [m] float32
    row_a: Tensor  # [B]
    col_a: Tensor  # [m]: |w_j|
    row_b: Tensor  # [B]
    col_b: Tensor  # [m]: |dw_j|


REL_APPROX = 1.01 * BF16_UNIT / (1 - BF16_UNIT) + 2.0**-20
REL_BIAS = 2.0**-20


def bf16_screen(x: Tensor, W: Tensor, bias: Tensor, out: Tensor | None = None) -> Screen | None:
    """The Screen of x W + bias (x [B, d], W [d, m], bias [m]; float32 on the CPU), or None where the kernels
    cannot use it (not float32 CPU tensors, no kernels, or norms so large the bound could overflow)."""
    if not (x.dim() == 2 and W.dim() == 2 and x.shape[1] == W.shape[0] and bias.shape == (W.shape[1],)):
        return None
    if not (x.dtype == W.dtype == bias.dtype == torch.float32) or (lib := usable_library(x, W, bias)) is None:
        return None
    (batch, d), m = x.shape, W.shape[1]
    xb, Wb = x.bfloat16(), W.bfloat16()
    wt, w_norm, w_error = W.new_empty(m, d), W.new_empty(m), W.new_empty(m)
    x_norm, x_error = x.new_empty(batch), x.new_empty(batch)
    lib.saelab_screen_prepare(x.data_ptr(), xb.data_ptr(), batch, W.data_ptr(), Wb.data_ptr(), d, m, wt.data_ptr(),
                              x_norm.data_ptr(), x_error.data_ptr(), w_norm.data_ptr(), w_error.data_ptr(),
                              threads())
    largest = float(x_norm.max()) * float(w_norm.max())
    if not (largest < 1e36 and bool(bias.isfinite().all())):  # also False for NaN/inf norms
        return None
    n = d + 64  # a little more than d: a blocked matmul may add partial sums
    gamma = n * F32_UNIT / (1 - n * F32_UNIT)
    sums = 3 * gamma * (1 + BF16_UNIT) ** 2
    row_a = (x_error + sums * x_norm).mul_(1.01)
    row_b = (x_norm + x_error).mul_(1.01)
    approx = torch.mm(xb, Wb, out=out)
    return Screen(approx, x, wt, bias, row_a, w_norm, row_b, w_error)


def _screen_args(screen: Screen) -> list:
    s = screen
    return [s.approx.data_ptr(), s.approx.stride(0), s.bias.data_ptr(), s.row_a.data_ptr(), s.col_a.data_ptr(),
            s.row_b.data_ptr(), s.col_b.data_ptr(), REL_APPROX, REL_BIAS, s.x.data_ptr(), s.wt.data_ptr(), s.x.shape[1],
            *s.approx.shape]


def screened_row_topk(screen: Screen, k: int) -> tuple[Tensor, Tensor, int] | None:
    """(ids, values, candidates): row_topk of the exact x W + bias, found through the screen; candidates is how
    many exact values were computed (k per row at least)."""
    rows, width = screen.approx.shape
    if screen.approx.stride(1) != 1 or not 0 < k <= width or (lib := library()) is None:
        return None
    ids = torch.empty(rows, k, dtype=torch.int64)
    values = torch.empty(rows, k, dtype=torch.float32)
    found = lib.saelab_screened_row_topk(*_screen_args(screen), k, values.data_ptr(), ids.data_ptr(), threads())
    return ids, values, found


def screened_batch_topk(screen: Screen, keep: int) -> tuple[Tensor, Tensor, int] | None:
    """(flat ids, values, candidates): batch_topk of the exact x W + bias, found through the screen; None if the
    kernel's cutoffs all failed (then the float32 matmul must decide)."""
    if screen.approx.stride(1) != 1 or not 0 < keep <= screen.approx.numel() or (lib := library()) is None:
        return None
    ids = torch.empty(keep, dtype=torch.int64)
    values = torch.empty(keep, dtype=torch.float32)
    found = lib.saelab_screened_batch_topk(*_screen_args(screen), keep, ids.data_ptr(), values.data_ptr(), threads())
    return (ids, values, found) if found >= 0 else None
