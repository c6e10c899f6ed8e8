"""The benchmark instruments themselves (not their figures): they run, report what the issue asks for, and
the loop-overhead timer attributes time to the right steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from saelab.kernels import native
from tests.conftest import REPO, optim_config, run_cli, tiny_overrides

VARIANTS = ["relu", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"]
SPARSE = ("topk", "batchtopk", "matryoshka_batchtopk")
FIELDS = {"tokens_per_s", "ms_per_step", "gflops", "roofline_gflops", "roofline_fraction", "forward_ms",
          "backward_ms", "optimizer_ms"}


def test_train_step_benchmark_reports_every_variant_on_synthetic_and_saved_activations(tmp_path):
    acts = tmp_path / "acts.pt"
    torch.save(torch.randn(512, 24) / 24**0.5, acts)
    jobs = [(v, ["--d-in", "16"]) for v in VARIANTS] + [("topk", ["--acts", str(acts)])] + [
        (v, ["--d-in", "8", "--clt", "2"]) for v in ("relu", "batchtopk")]  # 2 layers x 8 -> 64 latents
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
        if "--clt" in extra:  # useful FLOPs per layer block (2 B d F, d 8, F 32) and sparse pass (2 B k d, k 4)
            block, sparse = 2 * 64 * 8 * 32, 2 * 64 * 4 * 8
            clt, per_layer = ((2 * 2 + 3 * 3) * block, 5 * block) if variant == "relu" else (
                2 * block + 4 * sparse * 1.5, block + 4 * sparse)  # a CLT latent writes 1.5 layers on average
            assert result["clt_flops_over_per_layer"] == pytest.approx(clt / (2 * per_layer))
            assert result["clt_over_per_layer"] == pytest.approx(
                result["ms_per_step"] / result["per_layer_set_ms"])
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


# -- issue #14: the GPU side of the benchmarks, checked on the CPU ------------------------------------------------
GPU_VARIANTS = ["relu", "gated", "jumprelu", "topk", "batchtopk"]
SMOKE_VARIANTS = ["relu", "topk"]  # one dense and one sparse: the script's tables, in half the time of all five


def _bench_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}


def test_train_step_bf16_on_cpu_reports_device_precision_reference_and_syncs(tmp_path, monkeypatch, capsys,
                                                                               one_thread):
    """--precision bf16 runs the member's autocast on the CPU; the JSON gains the new keys (the CPU keeps the old
    ones), the reference ratio is the two rates' quotient, SAELAB_KERNELS reaches the run, and the CPU has no
    host synchronisations to count."""
    from benchmarks import train_step

    out = tmp_path / "bf16.json"
    monkeypatch.setenv("SAELAB_KERNELS", "torch")
    train_step.main(["--variant", "gated", "--d-in", "16", "--d-sae", "64", "--batch", "64", "--steps", "2",
                     "--warmup", "1", "--precision", "bf16", "--reference", "--sync-steps", "2", "--json", str(out)])
    stdout = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r.keys() >= FIELDS
    assert (r["device"], r["gpu"], r["precision"], r["matmul_dtype"]) == ("cpu", "cpu", "bf16", "bfloat16")
    assert r["saelab_kernels"] == "torch"
    assert r["kernels"] == "torch"  # SAELAB_KERNELS=torch was passed through to the dispatch
    assert r["roofline_tflops"] == pytest.approx(r["roofline_gflops"] / 1e3)
    assert r["tflops"] == pytest.approx(r["gflops"] / 1e3)
    assert r["reference_note"] is None and r["reference_tokens_per_s"] > 0
    assert r["reference_ratio"] == pytest.approx(r["tokens_per_s"] / r["reference_tokens_per_s"])
    assert r["syncs_per_step"] == 0.0 and r["reference_syncs_per_step"] == 0.0 and r["sync_steps"] == 2
    assert r["summary"] in stdout
    assert r["summary"].startswith("gated 16x64 b64 cpu bf16: ") and "reference" in r["summary"]


def _structured_batch(n: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Inputs built from a sparse code over a fixed dictionary: something an SAE can learn."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(4 * d_in, d_in, generator=gen), dim=1)
    code = torch.rand(n, 4 * d_in, generator=gen) * (torch.rand(n, 4 * d_in, generator=gen) < 0.05)
    return code @ atoms / 2


@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_reference_step_is_saelabs_loss_and_gradient_and_learns(variant, one_thread):
    """benchmarks/reference_step.py computes the variant's loss: at step 0, on the same weights and batch, its
    terms and its gradients for W_enc and W_dec (and JumpReLU's threshold) equal saelab's; then its own steps
    lower the loss on structured data."""
    from benchmarks.reference_step import ReferenceSAE
    from benchmarks.train_step import build
    from saelab.run.member import SAEMember
    from saelab.saes.decoder_rescale import raw_parameter

    torch.manual_seed(0)
    overrides = {"topk": ["k=4"], "batchtopk": ["k=4"], "jumprelu": ["threshold_init_density=null"]}
    sae = build(variant, 16, 128, overrides.get(variant, []))  # (the first batch's calibration is not a step)
    optim = optim_config(lr=1e-3, betas=None, lr_warmup_steps=0, lr_decay_fraction=0.0)
    member = SAEMember(sae, optim, max_steps=100, dead_window_tokens=10**9)
    reference = ReferenceSAE(variant, sae, lr=3e-3, betas=member.param_group()["betas"])
    x = _structured_batch(256, 16)
    coefficients = {name: value for name, (value, _) in sae.scheduled_coefficients.items()}
    loss, out = member.step_loss(x, coefficients)
    loss.backward()
    terms = reference.terms(x)
    reference_loss = sum(terms.values())
    reference_loss.backward()
    assert float(reference_loss) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert {k: float(v) for k, v in terms.items()} == pytest.approx(
        {k: float(v.detach()) for k, v in out.terms.items() if k in terms}, rel=1e-5, abs=1e-7)
    assert set(out.terms) - set(terms) <= {"auxk"}  # TopK's AuxK is zero while nothing is dead
    for name in ("W_enc", "W_dec"):  # the trained tensors (TopK's are rescaled: decoder_rescale.py)
        torch.testing.assert_close(getattr(reference, name).grad, raw_parameter(sae, name).grad, rtol=1e-4, atol=1e-6)
    if variant == "jumprelu":
        torch.testing.assert_close(reference.theta.grad, sae.raw_threshold.grad, rtol=1e-4, atol=1e-6)

    first = float(reference.step(x))
    for _ in range(30):
        last = float(reference.step(x))
    assert last < 0.9 * first
    if reference.unit_norm:
        norms = reference.W_dec.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))  # the unit-norm constraint held



def test_gpu_check_grid_records_each_failure_and_continues_after_a_run_that_kills_the_process(tmp_path):
    """benchmarks/gpu_check.run_grid: a run that raises is recorded as failed and the grid goes on; a run that
    kills the process stays "started", and the next invocation (gpu_check.sh starts one) records it as crashed
    and runs the rest; runs past the time budget are recorded as skipped."""
    jsonl = tmp_path / "steps.jsonl"
    script = (
        "import json, os, sys\n"
        "from benchmarks.gpu_check import run_grid\n"
        "def call(argv):\n"
        "    if argv == ['raise']: raise RuntimeError('CUDA out of memory')\n"
        "    if argv == ['die'] and not os.environ.get('SECOND'): os._exit(3)\n"
        "    return {'argv': argv}\n"
        "runs = [(name, {'variant': name}, [name]) for name in ('ok1', 'raise', 'die', 'ok2')]\n"
        "sys.exit(run_grid(__import__('pathlib').Path(sys.argv[1]), runs, call, float(sys.argv[2])))\n")
    first = subprocess.run([sys.executable, "-c", script, str(jsonl), "1e9"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert first.returncode == 3, first.stderr
    second = subprocess.run([sys.executable, "-c", script, str(jsonl), "1e9"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env=_bench_env(SECOND="1"))
    assert second.returncode == 0, second.stderr  # nothing new failed in the second invocation
    from benchmarks.gpu_check import latest, read_lines, step_table

    final = {run: r["status"] for run, r in latest(read_lines(jsonl)).items()}
    assert final == {"ok1": "ok", "raise": "failed", "die": "crashed", "ok2": "ok"}
    assert "CUDA out of memory" in latest(read_lines(jsonl))["raise"]["error"]
    skipped = tmp_path / "skipped.jsonl"
    subprocess.run([sys.executable, "-c", script, str(skipped), "-1"], cwd=REPO, check=True, timeout=60)
    assert {r["status"] for r in read_lines(skipped)} == {"skipped"}
    rows = step_table(read_lines(jsonl))[2:]
    assert len(rows) == 4 and any("failed: RuntimeError: CUDA out of memory" in row for row in rows)

@pytest.mark.slow
def test_gpu_check_smoke_on_cpu_prints_the_step_and_quality_tables(tmp_path):
    """benchmarks/gpu_check.sh with GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1 runs its parts at tiny shapes and ends
    with its report: the parts' status, one step row per variant, one quality row per variant; its files land in
    $OUT (at most 8, what the GPU harness brings back). Part (a) (tests/test_cuda.py, which skips without a GPU)
    is left out here to save a nested pytest run, and is reported as skipped."""
    out = tmp_path / "out"
    env = _bench_env(GPU_CHECK_DEVICE="cpu", GPU_CHECK_SMOKE="1", GPU_CHECK_STEP_PRECISIONS="fp32",
                     GPU_CHECK_VARIANTS=",".join(SMOKE_VARIANTS),
                     GPU_CHECK_PARTS="becd", GPU_CHECK_SAELENS_DIR=str(tmp_path / "absent"), PYTHON=sys.executable,
                     OUT=str(out), TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout[result.stdout.index("## GPU check"):]
    assert report.strip() == (out / "report.md").read_text().strip()
    assert "| shape | variant | precision | tok/s | TFLOP/s roofline | fraction | reference ratio | syncs/step |" \
        in report
    step_rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 64x512 |")
                 and line.split(" | ")[2] == "fp32"]
    assert sorted(row[1] for row in step_rows) == sorted(SMOKE_VARIANTS)
    for row in step_rows:  # tok/s, roofline, fraction, reference ratio, syncs: measured, not failure notes
        assert row[2] == "fp32" and float(row[3].replace(",", "")) > 0 and float(row[4]) > 0 and float(row[5]) >= 0
        assert row[6].endswith("x") and row[7] == "0.0"
    assert ("| variant | FVU 32-true | L0 32-true | FVU tf32 | L0 tf32 | FVU bf16-mixed | L0 bf16-mixed | flag |"
            in report)
    quality = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in report.splitlines()
               if line.split(" | ")[0].removeprefix("| ") in SMOKE_VARIANTS}
    assert sorted(quality) == sorted(SMOKE_VARIANTS)
    for row in quality.values():  # 32-true trained, and bf16-mixed is compared with it
        assert float(row[1]) > 0 and float(row[2]) > 0 and "%" in row[5]
    large_rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 64x512 | ")
                  and line.split(" | ")[2] == "256"]  # shape, variant, batch, tok/s, slice errors, verdict
    assert sorted(row[1] for row in large_rows) == ["relu", "topk"]
    assert all(float(row[3].replace(",", "")) > 0 and row[5] == "ok |" for row in large_rows), large_rows
    assert "w_dec_grad" in next(row[4] for row in large_rows if row[1] == "topk")
    for part in ("a. pytest tests/test_cuda.py | skipped", "b. benchmarks/train_step.py grid | ok",
                 "e. large shapes (slice check) | ok", "c. saelab.cli.train",
                 "d. SAELens and sparsify steps | skipped"):
        assert f"| {part}" in report
    files = sorted(p.name for p in out.iterdir())
    assert {"report.md", "steps.jsonl", "quality.json", "steps.log", "train.log"} <= set(files) and len(files) <= 8
    assert len(json.loads((out / "quality.json").read_text())["rows"]) == len(SMOKE_VARIANTS)



@pytest.mark.parametrize("variant", ["relu", "topk"])
def test_the_slice_check_passes_a_right_step_and_catches_a_wrong_slice(variant, monkeypatch):
    """benchmarks/slice_check.py at a small shape on the Triton kernels (interpreter): errors at rounding level on
    the kernels as they are; O(1) when the kernel's output is wrong where the slice looks (the last token's
    latents; the highest latents' rows of the sparse backward), as a wrapped 32-bit offset would make it."""
    from benchmarks.slice_check import check_slice
    from benchmarks.train_step import build
    from saelab.kernels import dispatch

    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    tk = dispatch.triton_kernels()
    x = torch.randn(70, 32, generator=torch.Generator().manual_seed(0)) / 32**0.5

    def slice_of_a_step() -> dict:
        torch.manual_seed(0)
        sae = build(variant, 32, 300, ["dead_window_tokens=10000000"] if variant == "topk" else [])
        return check_slice(variant, sae, x, {n: v for n, (v, _) in sae.scheduled_coefficients.items()}, rows=8,
                           latents=16)

    right = slice_of_a_step()
    assert right["slice_ok"] and max(v for k, v in right.items() if k.endswith("_error")) < 1e-5, right
    if variant == "relu":
        forward = tk.relu_forward
        monkeypatch.setattr(tk, "relu_forward", lambda pre, bias: (forward(pre, bias), pre[-1].add_(1.0))[0])
        key = "slice_latents_error"
    else:
        product = tk.sparse_t_dense

        def misplaced(*args, **kwargs):  # the highest latents' rows of Z^T dense never written
            out, sums = product(*args, **kwargs)
            (out[:, -32:] if kwargs.get("transposed", args[5] if len(args) > 5 else False) else out[-32:]).zero_()
            return out, sums

        monkeypatch.setattr(tk, "sparse_t_dense", misplaced)
        key = "slice_w_dec_grad_error"
    wrong = slice_of_a_step()
    assert not wrong["slice_ok"] and wrong[key] > 0.05, wrong
