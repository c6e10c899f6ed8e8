"""saelab.run.allocator: after SAEModule.on_fit_start, a step's freed tensors are reused instead of page-faulting.

Runs in subprocesses: the glibc setting is process-wide and cannot be undone, so each case gets a fresh process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys, torch
    from saelab.run.module import SAEModule
    # glibc's default mmap threshold (128 KiB), set explicitly: that turns off its dynamic raise, which otherwise
    # sometimes settles high enough that even the plain process stops faulting (0 per step seen under load), and
    # the baseline no longer shows what on_fit_start changes
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    from saelab.saes.relu import ReluSAE
    if sys.argv[1] == "fit":
        SAEModule.single(ReluSAE(ReluSAE.Config(d_in=8, d_sae=16)), {"lr": 1e-3}, max_steps=1,
                  dead_window_tokens=10).on_fit_start()
    x, w = torch.ones(4096, 384), torch.ones(3072, 384)  # a TopK step's [B, d_in] and [d_sae, d_in] shapes
    big = torch.ones(4608, 2304)  # a 6-layer CLT's [d_sae, d_in] (42 MB: above glibc's 32 MiB mmap ceiling)

    def step():  # fresh tensors of two sizes, alive together, then freed
        a = x * 2
        b = a + 1
        c = w * 2
        d = b - x
        e = c + 1
        f = big * 2
        del a, b, c, d, e, f

    for _ in range(3):  # settle glibc's dynamic thresholds
        step()
    windows = []  # the quietest of three windows: a fault from elsewhere in the process (a thread starting, the
    for _ in range(3):  # machine under load) would otherwise be counted as the step's
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            step()
        windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
    print(min(windows))
""")


def faults_per_step(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip())


def test_fit_start_stops_fresh_tensors_from_page_faulting():
    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's")
    plain, fit = faults_per_step("plain"), faults_per_step("fit")
    # Without the setting every such tensor is mmapped and unmapped again, and the next step faults its pages in
    # again: five tensors of 4.7-6.3 MB and one of 42 MB, ~17,000 faults per step (the 42 MB one alone ~10,000,
    # which the mmap threshold cannot keep: only turning mmap off does). With it, none of those: a quiet window
    # counts 0-2, and a loaded machine adds a few dozen from elsewhere in the process (38 seen under CI's xdist),
    # never thousands.
    assert plain > 1000
    assert fit < plain / 50  # the 42 MB tensor alone would leave ~10,000
