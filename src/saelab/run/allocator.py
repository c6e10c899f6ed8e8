"""Keep freed memory in the process, so a training step's fresh tensors do not page-fault every step.

glibc returns large freed blocks to the kernel (munmap, or trimming the heap's top), and the next step's
tensors of the same size are then faulted in again, page by page. A TopK step frees and re-allocates a few
[B, d_in] tensors and gradients (6 MB each at B 4096, d_in 384): about 2,000 page faults per step here,
costing ~12% of its time. Raising glibc's mmap and trim thresholds keeps those blocks for reuse. Blocks above
the mmap threshold's 32 MiB ceiling (a 6-layer CLT's [4608, 2304] gradients: 42 MB each, ~32,000 faults per
step, a tenth of its step) are always mmapped, so mmap is turned off altogether: every block comes from the
heap, where freed memory stays. The process then holds on to its peak memory, which training reaches every step
anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's thresholds (once per process); False where malloc is not glibc's (then nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            and bool(mallopt(M_MMAP_MAX, 0)))
