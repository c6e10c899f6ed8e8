"""The CPU kernels' shared library: sparse_kernels.cpp compiled once per machine, loaded through ctypes, and the
tensors it accepts (kernels/native.py and kernels/native_screen.py wrap its functions).

The kernels are plain C++ with no torch headers, so they build in ~2 s with the system's g++ (a torch C++
extension takes ~40 s and needs ninja). The shared object is cached under $XDG_CACHE_HOME/saelab/kernels (or
~/.cache), keyed by the source, the compiler command and this CPU's instruction-set flags (-march=native), so a
home directory shared across machines never loads a library built for another CPU.

library() is None when the kernels do not apply (no compiler, a failed build, SAELAB_NATIVE_KERNELS=0, or
SAELAB_KERNELS other than auto); the wrappers then return None and the caller runs its torch twin.
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
_span = (_i64, _i64, _int)  # a LayerSpan: latents per group, columns per group, suffix (native.LayerSpan)
_SIGNATURES = {
    "saelab_row_topk": (None, [_ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int]),
    "saelab_batch_topk": (_i64, [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _int]),
    "saelab_group_by": (None, [_ptr, _i64, _i64, _ptr, _ptr]),
    "saelab_sparse_decode": (None, [_ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, *_span, _int]),
    "saelab_sampled_dot": (None, [_ptr, _ptr, _i64, _ptr, _ptr, _i64, _ptr, *_span, _int]),
    "saelab_sparse_t_dense": (None, [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _int, _ptr, *_span, _int]),
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


@functools.cache
def cpu_flags() -> str:
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
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), cpu_flags().encode()]))
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


def usable_library(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is a contiguous CPU float32 / int64 tensor."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.int64) or not t.is_contiguous():
            return None
    return library()


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels run here and take these tensors (contiguous, on the CPU, float32 or int64)."""
    return usable_library(*tensors) is not None


def threads() -> int:
    return torch.get_num_threads()


def pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
