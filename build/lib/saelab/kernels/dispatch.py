"""Which kernels run a fused training step: one decision, made from the tensors' device and dtype.

    native  CPU, float32: sparse_kernels.cpp through kernels/native.py (when a C++ compiler is there)
    triton  CUDA, float32, when triton imports: kernels/triton_gpu.py (no host synchronisation on any step)
    torch   anything else (float64 included: the Triton kernels compute in float32): torch operators, in
            the fused Functions' modules beside the calls above

SAELAB_KERNELS overrides the choice for every step: `auto` (the default, as above), `torch` (the fallback
everywhere: what a new kernel is checked against), or `triton` (Triton's kernels on any device, float32 only; on
the CPU they run only under Triton's interpreter, TRITON_INTERPRET=1, which is how CI tests them). Before training,
`check_launch` runs one tiny Triton kernel where Triton was chosen, so a GPU or machine Triton cannot launch on
(no C compiler for its launcher, an unsupported GPU) is named at start, not at the first step. The variant files
never see this module: they call the fused autograd Functions (kernels/fused_*.py, reconstruction.py,
sparse_products.py) and selections (selection.py), which ask `backend_for` what to run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.kernels.choice import VARIABLE, requested

BACKENDS = ("native", "triton", "torch")


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
    float32 = all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_importable():
            raise ConfigError(VARIABLE, choice, "'auto' or 'torch': triton is not installed")
        if first.device.type == "cpu" and not interpreting():
            raise ConfigError(VARIABLE, choice, "'auto' or 'torch' on the CPU (or TRITON_INTERPRET=1, Triton's "
                                                "interpreter)")
        if not float32:
            raise ConfigError(VARIABLE, choice, "'auto' or 'torch' for this run's dtype (the Triton kernels "
                                                "compute in float32)")
        return "triton"
    if first.device.type == "cuda" and float32 and triton_importable():
        return "triton"
    if first.device.type == "cpu" and float32:
        from saelab.kernels import native

        if native.library() is not None:
            return "native"
    return "torch"


def check_launch(device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
    """Before training on `device` in `dtype`: where its steps would run Triton, launch one tiny kernel now, so a
    machine Triton cannot launch on fails at start with one line saying what to do (and not mid-run)."""
    device = torch.device(device)
    if backend_for(torch.empty(0, device=device, dtype=dtype)) != "triton":
        return
    reason = _launch_failure(str(device))
    if reason is not None:
        raise ConfigError(VARIABLE, requested(), f"'torch' on {device}: Triton could not launch a kernel here "
                                                 f"({reason})")


@functools.cache
def _launch_failure(device: str) -> str | None:
    """None if a Triton kernel launches and completes on `device`, else the error's first line (cached: once)."""
    try:
        pre = torch.zeros(1, 1, device=device)
        triton_kernels().relu_forward(pre, torch.zeros(1, device=device))
        if pre.device.type == "cuda":
            torch.cuda.synchronize(pre.device)
    except Exception as err:  # noqa: BLE001 - any failure to launch is the answer, named in the message
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    return None


def host_sync_free(t: Tensor) -> bool:
    """Whether a step on t's device must avoid data-dependent shapes (nonzero, boolean indexing, .item()): on an
    accelerator each one stalls the host until the queue drains; on the CPU they cost nothing extra."""
    return t.device.type != "cpu" or requested() == "triton"


def triton_kernels() -> ModuleType:
    """kernels/triton_gpu.py, imported on first use (importing triton costs about a second)."""
    from saelab.kernels import triton_gpu

    return triton_gpu
