"""The benchmark instruments themselves (not their figures): they run, report what the issue asks for, and
the loop-overhead timer attributes time to the right steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from saelab.saes import native
from tests.conftest import REPO, run_cli, tiny_overrides

VARIANTS = ["relu", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"]
SPARSE = ("topk", "batchtopk", "matryoshka_batchtopk")
FIELDS = {"tokens_per_s", "ms_per_step", "gflops", "roofline_gflops", "roofline_fraction", "forward_ms",
          "backward_ms", "optimizer_ms"}


def test_train_step_benchmark_reports_every_variant_on_synthetic_and_saved_activations(tmp_path):
    acts = tmp_path / "acts.pt"
    torch.save(torch.randn(512, 24) / 24**0.5, acts)
    jobs = [(v, ["--d-in", "16"]) for v in VARIANTS] + [("topk", ["--acts", str(acts)])]
    argvs = [["--variant", v, "--d-sae", "64", "--batch", "64", "--steps", "3", "--warmup", "1", *extra,
              "--json", str(tmp_path / f"{i}.json"), *(["k=4"] if "topk" in v else [])]
             for i, (v, extra) in enumerate(jobs)]
    runner = ("import json, sys; from benchmarks import train_step; "
              "[train_step.main(a) for a in json.loads(sys.argv[1])]")
    subprocess.run([sys.executable, "-c", runner, json.dumps(argvs)], cwd=REPO, check=True, capture_output=True,
                   timeout=300)
    for i, (variant, extra) in enumerate(jobs):
        result = json.loads((tmp_path / f"{i}.json").read_text())
        assert result["variant"] == variant
        assert result.keys() >= FIELDS
        assert all(result[name] > 0 for name in FIELDS)
        assert result["d_in"] == (24 if "--acts" in extra else 16)  # a saved file sets d_in
        assert result["tokens_per_s"] == pytest.approx(64 / (result["ms_per_step"] / 1e3))
        low, high = result["roofline_fraction_range"]  # the fraction is the median of step/roofline pairs
        assert 0 < low <= result["roofline_fraction"] <= high
        assert ("dense_equivalent_fraction" in result) == (variant in SPARSE)
        assert result["native_kernels"] is True  # g++ is here, so TopK's figures are the C++ kernels'
        if variant in SPARSE:  # the bf16 screen ran exactly where the CPU has bf16 dot products
            assert result["bf16_screen"] is native.fast_bf16()
            if result["bf16_screen"]:  # at least the k = 4 selected values per token were computed exactly
                assert 4 <= result["screen_candidates_per_token"] <= 64
                assert result["bf16_roofline_gflops"] > 0


def test_step_timer_attributes_each_steps_work_to_its_own_period(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """benchmarks/loop_overhead.StepTimer, added to a real run by override: one entry per step, and the timed
    benchmark part of each step (loss, backward, hooks, Adam) lies within that step's wall period."""
    timer = tmp_path / "timer.json"
    result = run_cli([*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"),
                      "+callbacks.step_timer._target_=benchmarks.loop_overhead.StepTimer",
                      f"+callbacks.step_timer.path={timer}"])
    assert result.returncode == 0, result.stderr[-2000:]
    timings = json.loads(timer.read_text())
    steps = 25600 // 256
    assert len(timings["period_s"]) == len(timings["step_s"]) == steps - 1
    for period, step in zip(timings["period_s"], timings["step_s"], strict=True):
        assert 0 < step <= period
