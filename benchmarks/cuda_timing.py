"""Timing and precision helpers shared by benchmarks/train_step.py and benchmarks/saelens_step.py.

The same measuring loop runs on the CPU and on a GPU: a `Clock` hands out marks (host time on the CPU, CUDA
events on a GPU) that are read only after the timed region, so timing a GPU step never synchronises inside it.
`matmul_precision` sets what "fp32", "tf32" and "bf16" mean for float32 matmuls, `Roofline` times the step's
matmul shapes alone, and `count_host_syncs` counts the host synchronisations a step makes (each one stalls the
GPU's queue while the host waits).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
# Runtime calls that block the host until the GPU has caught up. A device-to-host copy (.item(), bool(t), a
# Python branch on a tensor) shows up as a cudaMemcpyAsync plus a cudaStreamSynchronize; on the device side as a
# "Memcpy DtoH" activity.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """float32 matmuls in IEEE float32 ("fp32", "bf16": TF32 off) or TF32 ("tf32"), restored afterwards.

    Only the legacy switches are used, and consistently (set_float32_matmul_precision, then allow_tf32 to the
    same value): torch >= 2.9 refuses to read the precision back once the legacy and the new fp32_precision
    API have been mixed. bf16 is the SAE member's autocast, so its float32 remainder runs in IEEE float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed APIs elsewhere in the process: restore to the default afterwards
        previous = "highest"
    tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)  # sets allow_tf32 to match


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype the step's matmuls run in: bfloat16 under the bf16 autocast, else float32 (TF32 or not)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


class Clock:
    """Marks on the host clock (CPU) or CUDA events recorded on the current stream (GPU).

    `mark()` never waits for the device; `seconds(a, b)` reads a pair once `sync()` has run after the timed
    region. On the CPU the marks are perf_counter() values, exactly what the benchmarks timed before.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1e3
        return end - start


class Roofline:
    """An SAE step's dense matmul shapes (forward and backward; the first `passes` of the list below, which is
    how benchmarks/train_step.py counts them), run back to back with preallocated outputs; in float32, or in
    another dtype (bfloat16: the rate of the bf16 screen's encoder matmul, or of a bf16-autocast step's matmuls),
    on the step's device."""

    def __init__(self, passes: int, batch: int, d_in: int, d_sae: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.clock = Clock(device)
        with torch.device(device):
            x, f = torch.randn(batch, d_in, dtype=dtype), torch.randn(batch, d_sae, dtype=dtype)
            w_enc, w_dec = torch.randn(d_in, d_sae, dtype=dtype), torch.randn(d_sae, d_in, dtype=dtype)
            out_f, out_x = torch.empty(batch, d_sae, dtype=dtype), torch.empty(batch, d_in, dtype=dtype)
            out_we, out_wd = torch.empty(d_in, d_sae, dtype=dtype), torch.empty(d_sae, d_in, dtype=dtype)
        self.shapes = [
            lambda: torch.mm(x, w_enc, out=out_f),  # encoder forward
            lambda: torch.mm(x.t(), f, out=out_we),  # dW_enc
            lambda: torch.mm(f, w_dec, out=out_x),  # decoder forward
            lambda: torch.mm(f.t(), x, out=out_wd),  # dW_dec
            lambda: torch.mm(x, w_dec.t(), out=out_f),  # df
            lambda: torch.mm(f, w_dec, out=out_x),  # aux decoder forward (gated)
            lambda: torch.mm(x, w_dec.t(), out=out_f),  # aux input gradient (gated)
        ][:passes]
        self.flops = len(self.shapes) * 2.0 * batch * d_in * d_sae
        self.run()  # warm-up

    def run(self) -> tuple[Any, Any]:
        """Clock marks around one pass over the shapes (seconds: self.clock.seconds, after clock.sync())."""
        start = self.clock.mark()
        for fn in self.shapes:
            fn()
        return start, self.clock.mark()

    def gflops(self, repeats: int) -> float:
        marks = [self.run() for _ in range(repeats)]
        self.clock.sync()
        return self.flops / statistics.median(self.clock.seconds(*m) for m in marks) / 1e9


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or "cpu"."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def count_host_syncs(step: Callable[[], Any], steps: int, device: torch.device | str) -> dict[str, Any]:
    """Host synchronisations per call of `step`, counted two ways.

    `syncs_per_step`: from torch.profiler (CPU activity, plus CUDA on a GPU), the blocking runtime calls
    (SYNC_CALLS) or, where the profiler exposes no such call, the device-to-host copies (the host waits for
    each); the same count over as many empty calls is subtracted, so the profiler's own synchronisations do
    not count. `sync_events` lists every runtime call or device activity named *Synchronize* or *Memcpy* with
    its count per `steps` calls, for reading the figure. `sync_warnings_per_step`: the synchronising operations
    torch.cuda.set_sync_debug_mode("warn") reports (.item(), nonzero, boolean indexing, copies to the host),
    which needs no CUPTI. On the CPU there is no device queue to wait for, and both are 0 by construction.
    """
    device = torch.device(device)
    result: dict[str, Any] = {"sync_steps": steps, "sync_warnings_per_step": sync_warnings(step, steps, device)}
    try:
        baseline = profiled_counts(lambda: None, steps, device)
        counts = profiled_counts(step, steps, device)
    except Exception as err:  # e.g. no CUPTI: keep the sync-debug count
        return result | {"syncs_per_step": result["sync_warnings_per_step"], "dtoh_per_step": None,
                         "sync_events": {}, "sync_error": f"{type(err).__name__}: {err}"}
    counts.subtract(baseline)
    counts = Counter({name: n for name, n in counts.items() if n > 0})
    syncs = sum(counts[name] for name in SYNC_CALLS)
    dtoh = sum(n for name, n in counts.items() if "DtoH" in name or "Device -> Pageable" in name)
    return result | {"syncs_per_step": max(syncs, dtoh) / steps, "dtoh_per_step": dtoh / steps,
                     "sync_events": dict(sorted(counts.items()))}


def profiled_counts(step: Callable[[], Any], steps: int, device: torch.device) -> Counter[str]:
    """Profiler events named *Synchronize* or *Memcpy* over `steps` calls of `step`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()  # before the profiled region, so that this call is not counted
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    return Counter(e.name for e in prof.events() if "Synchronize" in e.name or "Memcpy" in e.name)


def sync_warnings(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Synchronising CUDA operations per call of `step`, as torch.cuda's sync debug mode reports them."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message).lower() for w in caught) / steps


def synthetic_activations(batch: int, d_in: int, device: torch.device) -> torch.Tensor:
    """What every library's step is fed here: randn / sqrt(d_in), seed 0, four batches or 16384 rows at least."""
    torch.manual_seed(0)
    return (torch.randn(max(4 * batch, 16384), d_in) / d_in**0.5).to(device)


def median_step_seconds(acts: torch.Tensor, batch: int, warmup: int, steps: int,
                        step: Callable[[torch.Tensor, int], Any]) -> float:
    """The median seconds of step(x, index) over `steps` timed calls after `warmup`, x cycling through acts."""
    clock = Clock(acts.device)
    marks = []
    for index in range(warmup + steps):
        start_row = (index * batch) % (len(acts) - batch + 1)
        start = clock.mark()
        step(acts[start_row : start_row + batch], index)
        if index >= warmup:
            marks.append((start, clock.mark()))
    clock.sync()
    return statistics.median(clock.seconds(*m) for m in marks)
