"""Which kernels run a fused training step: one decision, made from the tensors' device and dtype.

    native  CPU, float32: sparse_kernels.cpp through kernels/native.py (when a C++ compiler is there)
    triton  CUDA, when triton imports: kernels/triton_gpu.py (no host synchronisation on any step)
    torch   anything else: torch operators, in kernels/fused.py beside the calls above

SAELAB_KERNELS overrides the choice for every step: `auto` (the default, as above), `torch` (the fallback
everywhere: what a new kernel is checked against), or `triton` (Triton's kernels on any device; on the CPU they
run only under Triton's interpreter, TRITON_INTERPRET=1, which is how CI tests them). The variant files never
see this module: they call kernels/fused.py's autograd Functions, which ask `backend_for` what to run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor

VARIABLE = "SAELAB_KERNELS"
CHOICES = ("auto", "torch", "triton")
BACKENDS = ("native", "triton", "torch")


def requested() -> str:
    """The SAELAB_KERNELS choice (auto if unset); anything else is refused by name."""
    value = os.environ.get(VARIABLE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{VARIABLE}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


@functools.cache
def triton_importable() -> bool:
    """Whether triton is installed (a CUDA build of torch brings it; CPU installs get it with the dev extra)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(*tensors: Tensor) -> str:
    """native, triton or torch for a step on these tensors (see the module docstring)."""
    choice = requested()
    first = tensors[0]
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_importable():
            raise ValueError(f"{VARIABLE}=triton: triton is not installed")
        if first.device.type == "cpu" and not interpreting():
            raise ValueError(f"{VARIABLE}=triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return "triton"
    if first.device.type == "cuda" and triton_importable():
        return "triton"
    if first.device.type == "cpu" and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        from saelab.kernels import native

        if native.library() is not None:
            return "native"
    return "torch"


def host_sync_free(t: Tensor) -> bool:
    """Whether a step on t's device must avoid data-dependent shapes (nonzero, boolean indexing, .item()): on an
    accelerator each one stalls the host until the queue drains; on the CPU they cost nothing extra."""
    return t.device.type != "cpu" or requested() == "triton"


def triton_kernels() -> ModuleType:
    """kernels/triton_gpu.py, imported on first use (importing triton costs about a second)."""
    from saelab.kernels import triton_gpu

    return triton_gpu
