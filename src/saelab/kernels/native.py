"""The training step's CPU kernels (sparse_kernels.cpp), compiled once per machine and called through ctypes.

TopK/BatchTopK training is one encoder matmul, then selection and sparse products; torch's operators for the
latter (topk, embedding_bag, CSR products) cost more than the matmul budget allows on CPU. JumpReLU and Gated
steps are matmuls with elementwise work between them, which torch spreads over many passes of [B, d_sae]
tensors; jumprelu_forward and the gated_* kernels make it one pass each. The kernels are
plain C++ with no torch headers, so they build in ~2 s with the system's g++ (a torch C++ extension takes
~40 s and needs ninja). The shared object is cached under $XDG_CACHE_HOME/saelab/kernels (or ~/.cache),
keyed by the source, the compiler command and this CPU's instruction-set flags (-march=native), so a home
directory shared across machines never loads a library built for another CPU.

The bf16 screen (Screen, bf16_screen, screened_row_topk, screened_batch_topk) goes further on CPUs with bf16
dot products: the encoder matmul runs in bf16, and a proven error bound limits the exact float32 work to the
entries that could still be selected.

Every function returns None when the kernels do not apply (no compiler, SAELAB_NATIVE_KERNELS=0, tensors not
on the CPU, or not float32), and the caller then runs its torch twin; tests/test_native_kernels.py checks
each kernel against that twin.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saelab.kernels.choice import requested

SOURCE = Path(__file__).with_name("sparse_kernels.cpp")
# -march=native: AVX-512 where the CPU has it (the kernels' fast paths); 512-bit vectors are GCC's choice to
# make only when asked on x86. -fopenmp: the kernels share torch's OpenMP threads (see sparse_kernels.cpp).
FLAGS = ("-O3", "-march=native", *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()),
         "-fopenmp", "-std=c++17", "-shared", "-fPIC")
DISABLE_VARIABLE = "SAELAB_NATIVE_KERNELS"  # set to 0 to use the torch operators instead

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "saelab_row_topk": (None, [_ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int]),
    "saelab_batch_topk": (_i64, [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _int]),
    "saelab_group_by": (None, [_ptr, _i64, _i64, _ptr, _ptr]),
    "saelab_sparse_decode": (None, [_ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _int]),
    "saelab_sampled_dot": (None, [_ptr, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _int]),
    "saelab_sparse_t_dense": (None, [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _int, _ptr, _int]),
    **{name: (_i64, [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_float, ctypes.c_float, _ptr, _ptr, _i64, _i64,
                     _i64, _i64, _ptr, _ptr, _int])
       for name in ("saelab_screened_row_topk", "saelab_screened_batch_topk")},
    "saelab_jumprelu_forward": (_i64, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float, ctypes.c_float, _ptr, _ptr,
                                       _ptr, _i64, _ptr, _ptr, _int]),
    "saelab_gated_forward": (ctypes.c_double, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int]),
    "saelab_gated_backward_mag": (None, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _int]),
    "saelab_gated_backward_gate": (None, [_ptr, _ptr, _ptr, _i64, _i64, _ptr, _int]),
    "saelab_screen_prepare": (None, [_ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int]),
}
BF16_UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits, rounded to nearest)
F32_UNIT = 2.0**-24


@functools.cache
def _cpu_flags() -> str:
    """This CPU's instruction-set flags line (read once: the CPU does not change under a running process)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saelab" / "kernels"


def compile_kernels(compiler: str, flags: tuple[str, ...] | None = None) -> Path:
    """Compile SOURCE (with FLAGS unless given) into the cache once; the name hashes all that shapes the binary."""
    flags = FLAGS if flags is None else flags
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_flags().encode()]))
    target = cache_dir() / f"sparse_kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename: never half-written
            built = Path(tmp) / target.name
            subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)], check=True, capture_output=True,
                           text=True, timeout=300)
            os.replace(built, target)
    return target


def bind(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when switched off (SAELAB_NATIVE_KERNELS=0, or SAELAB_KERNELS other than auto:
    kernels/dispatch.py) or they cannot be built here."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0" or requested() != "auto":
        return None
    return _load()


@functools.cache
def _load() -> ctypes.CDLL | None:
    """Build (once per machine) and load the kernels; None, with one warning saying why, if that fails."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        warnings.warn(f"saelab: no C++ compiler ({os.environ.get('CXX', 'g++')}); the CPU training kernels are off "
                      "and torch operators run instead (slower)", RuntimeWarning, stacklevel=2)
        return None
    try:
        return bind(compile_kernels(compiler))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"saelab: building {SOURCE.name} failed ({str(detail).strip()[:300]}); the CPU training "
                      "kernels are off and torch operators run instead (slower)", RuntimeWarning, stacklevel=2)
        return None


def _usable(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is a contiguous CPU float32 / int64 tensor."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.int64) or not t.is_contiguous():
            return None
    return library()


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels run here and take these tensors (contiguous, on the CPU, float32 or int64)."""
    return _usable(*tensors) is not None


def _threads() -> int:
    return torch.get_num_threads()


def _bias_ok(bias: Tensor | None, width: int) -> bool:
    return bias is None or (bias.dtype == torch.float32 and bias.shape == (width,) and _usable(bias) is not None)


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
    lib.saelab_row_topk(scores.data_ptr(), _pointer(bias), rows, width, scores.stride(0), k, values.data_ptr(),
                        ids.data_ptr(), _threads())
    return ids, values


def batch_topk(scores: Tensor, keep: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """(flat ids, values) of the `keep` largest entries of the [B, width] matrix scores + bias (ties: lower flat
    index), ids ascending (so grouped by row)."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or (lib := _usable(scores)) is None:
        return None
    if not 0 < keep <= scores.numel() or not _bias_ok(bias, scores.shape[1]):
        return None
    ids = torch.empty(keep, dtype=torch.int64)
    values = torch.empty(keep, dtype=torch.float32)
    kept = lib.saelab_batch_topk(scores.data_ptr(), _pointer(bias), scores.numel(), scores.shape[1], keep,
                                 ids.data_ptr(), values.data_ptr(), _threads())
    return (ids, values) if kept == keep else None


def group_by(ids: Tensor, n_groups: int) -> tuple[Tensor, Tensor] | None:
    """(order, offsets [n_groups + 1]): a stable sort of entries by id (a counting sort)."""
    if (lib := _usable(ids)) is None or ids.dtype != torch.int64:
        return None
    order = torch.empty_like(ids)
    offsets = torch.empty(n_groups + 1, dtype=torch.int64)
    lib.saelab_group_by(ids.data_ptr(), ids.numel(), n_groups, order.data_ptr(), offsets.data_ptr())
    return order, offsets


def sparse_decode(values: Tensor, cols: Tensor, row_offsets: Tensor, table: Tensor, bias: Tensor | None = None,
                  minus: Tensor | None = None, row_sq: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """(out, ||out[r]||^2 per row if row_sq): out[r] = bias + sum over row r's entries of values[e] table[cols[e]]
    - minus[r], a [rows, d] tensor (bias [d] and minus [rows, d] optional)."""
    extra = [t for t in (bias, minus) if t is not None]
    if any(t.dtype != torch.float32 for t in (values, table, *extra)):
        return None
    if (lib := _usable(values, cols, row_offsets, table, *extra)) is None:
        return None
    rows, d = row_offsets.numel() - 1, table.shape[1]
    if (bias is not None and bias.shape != (d,)) or (minus is not None and minus.shape != (rows, d)):
        return None
    out = torch.empty(rows, d, dtype=torch.float32)
    sq = torch.empty(rows, dtype=torch.float32) if row_sq else None
    lib.saelab_sparse_decode(values.data_ptr(), cols.data_ptr(), row_offsets.data_ptr(), rows, table.data_ptr(), d,
                             _pointer(bias), _pointer(minus), out.data_ptr(), _pointer(sq), _threads())
    return out, sq


def sampled_dot(cols: Tensor, row_offsets: Tensor, table: Tensor, dense: Tensor) -> Tensor | None:
    """out[e] = dense[row(e)] . table[cols[e]] for each entry e (rows given by row_offsets)."""
    if table.dtype != torch.float32 or dense.dtype != torch.float32:
        return None
    if (lib := _usable(cols, row_offsets, table, dense)) is None:
        return None
    out = torch.empty(cols.numel(), dtype=torch.float32)
    lib.saelab_sampled_dot(cols.data_ptr(), row_offsets.data_ptr(), row_offsets.numel() - 1, table.data_ptr(),
                           dense.data_ptr(), table.shape[1], out.data_ptr(), _threads())
    return out


def sparse_t_dense(order: Tensor, col_offsets: Tensor, rows: Tensor, coef: Tensor, dense: Tensor,
                   transposed: bool = False, col_sums: bool = False,
                   shift: Tensor | None = None) -> tuple[Tensor, Tensor | None] | None:
    """Z^T (dense - shift) ([n_cols, d], or its transpose [d, n_cols]) for the sparse Z with entries
    (rows[e], col, coef[e]) grouped by column (order, col_offsets); shift [d] is optional (none: zero). Also Z's
    column sums if col_sums."""
    extra = [] if shift is None else [shift]
    if any(t.dtype != torch.float32 for t in (coef, dense, *extra)):
        return None
    if (lib := _usable(order, col_offsets, rows, coef, dense, *extra)) is None:
        return None
    n_cols, d = col_offsets.numel() - 1, dense.shape[1]
    if shift is not None and shift.shape != (d,):
        return None
    out = torch.empty((d, n_cols) if transposed else (n_cols, d), dtype=torch.float32)
    sums = torch.empty(n_cols, dtype=torch.float32) if col_sums else None
    lib.saelab_sparse_t_dense(order.data_ptr(), col_offsets.data_ptr(), n_cols, rows.data_ptr(), coef.data_ptr(),
                              dense.data_ptr(), d, _pointer(shift), out.data_ptr(), int(transposed), _pointer(sums),
                              _threads())
    return out, sums


@functools.cache
def fast_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX), where torch's bf16 matmul
    runs ~2.6x faster than float32 (24 vs 63 ms for [4096, 384] x [384, 3072] here); without them it is slower.
    Asked every TopK step, so /proc/cpuinfo is read once."""
    flags = _cpu_flags().split()
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
    if not (x.dtype == W.dtype == bias.dtype == torch.float32) or (lib := _usable(x, W, bias)) is None:
        return None
    (batch, d), m = x.shape, W.shape[1]
    xb, Wb = x.bfloat16(), W.bfloat16()
    wt, w_norm, w_error = W.new_empty(m, d), W.new_empty(m), W.new_empty(m)
    x_norm, x_error = x.new_empty(batch), x.new_empty(batch)
    lib.saelab_screen_prepare(x.data_ptr(), xb.data_ptr(), batch, W.data_ptr(), Wb.data_ptr(), d, m, wt.data_ptr(),
                              x_norm.data_ptr(), x_error.data_ptr(), w_norm.data_ptr(), w_error.data_ptr(),
                              _threads())
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
    found = lib.saelab_screened_row_topk(*_screen_args(screen), k, values.data_ptr(), ids.data_ptr(), _threads())
    return ids, values, found


def screened_batch_topk(screen: Screen, keep: int) -> tuple[Tensor, Tensor, int] | None:
    """(flat ids, values, candidates): batch_topk of the exact x W + bias, found through the screen; None if the
    kernel's cutoffs all failed (then the float32 matmul must decide)."""
    if screen.approx.stride(1) != 1 or not 0 < keep <= screen.approx.numel() or (lib := library()) is None:
        return None
    ids = torch.empty(keep, dtype=torch.int64)
    values = torch.empty(keep, dtype=torch.float32)
    found = lib.saelab_screened_batch_topk(*_screen_args(screen), keep, ids.data_ptr(), values.data_ptr(), _threads())
    return (ids, values, found) if found >= 0 else None


def _matrices_and_vectors(matrices: tuple[Tensor, ...], vectors: tuple[Tensor, ...]) -> ctypes.CDLL | None:
    """The library, if the matrices are float32 [B, m] alike and the vectors float32 [m], all contiguous CPU."""
    shape = matrices[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in matrices) or any(v.shape != (shape[1],) for v in vectors):
        return None
    if any(t.dtype != torch.float32 for t in (*matrices, *vectors)):
        return None
    return _usable(*matrices, *vectors)


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
                                             _threads())
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
                                     _threads())
    return total, fired


def gated_backward_mag(g: Tensor, f: Tensor, pi_mag: Tensor, gain: Tensor) -> tuple[Tensor, Tensor] | None:
    """In place over g (dL/df): g <- g 1[f > 0] gain; returns the column sums of g 1[f > 0] and of pi_mag g 1[f > 0]."""
    if (lib := _matrices_and_vectors((g, f, pi_mag), (gain,))) is None:
        return None
    sum_g, sum_pg = torch.empty(g.shape[1]), torch.empty(g.shape[1])
    lib.saelab_gated_backward_mag(g.data_ptr(), f.data_ptr(), pi_mag.data_ptr(), gain.data_ptr(), *g.shape,
                                  sum_g.data_ptr(), sum_pg.data_ptr(), _threads())
    return sum_g, sum_pg


def gated_backward_gate(g_gate: Tensor, gate: Tensor, g_z: Tensor) -> Tensor | None:
    """g_z += g_gate 1[gate > 0]; returns that term's column sums."""
    if (lib := _matrices_and_vectors((g_gate, gate, g_z), ())) is None:
        return None
    sums = torch.empty(g_z.shape[1])
    lib.saelab_gated_backward_gate(g_gate.data_ptr(), gate.data_ptr(), g_z.data_ptr(), *g_z.shape, sums.data_ptr(),
                                   _threads())
    return sums
