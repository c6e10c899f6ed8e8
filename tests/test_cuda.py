"""The GPU path at realistic shapes (skipped without CUDA; benchmarks/gpu_check.sh runs it on an H100/H200).

* Every variant's fused step on the Triton kernels gives the SPEC's loss terms and gradients (the references of
  tests/test_step_equivalence.py, run by autograd on the same GPU), at widths with tails.
* Non-logging steps never synchronise with the host (torch.cuda.set_sync_debug_mode("error")), AuxK included.
* A short `saelab-train` run of each variant on CUDA with the default precision (auto: tf32) finishes with finite
  held-out metrics.
"""

from __future__ import annotations

import json

import pytest
import torch

from saelab.kernels import dispatch
from saelab.run.member import SAEMember
from saelab.saes import build_sae
from tests.conftest import run_cli
from tests.test_host_sync import OPTIM, VARIANTS, member_step
from tests.test_step_equivalence import check_wide_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D_IN, D_SAE, BATCH = 768, 24576 + 40, 1024  # d_sae with a tail past every block size


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """References and kernels compared in full float32 (TF32 would differ by its rounding, not by a bug)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _input() -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.randn(BATCH, D_IN, device="cuda", generator=g) / D_IN**0.5 + 0.01


@pytest.mark.parametrize("name", ["relu", "jumprelu", "gated", "topk", "batchtopk"])
def test_triton_step_matches_the_spec_at_a_realistic_width(name):
    x = _input()
    assert dispatch.backend_for(x) == "triton"
    check_wide_step(name, D_IN, D_SAE, x, k_aux=256, device="cuda")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_non_logging_steps_do_not_synchronise(variant):
    torch.manual_seed(0)
    config = {**VARIANTS[variant], "d_in": D_IN, "d_sae": 4096}
    if "matryoshka_widths" in config:
        config["matryoshka_widths"] = [256, 1024, 4096]
    if "d_out" in config:
        config["d_out"] = D_IN
    sae = build_sae(config).cuda()
    member = SAEMember(sae, OPTIM, max_steps=10, dead_window_tokens=50).cuda()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    with torch.no_grad():
        sae.tokens_since_fired[::3] = 100
        sae.tokens_seen.fill_(100)

    def step(index: int) -> None:
        member_step(member, optimizer, _input(), index)

    step(0)
    step(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index in (2, 3, 4):
            step(index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in sae.parameters())


@pytest.mark.parametrize("sae", ["relu", "gated", "jumprelu", "topk", "batchtopk"])
def test_a_short_run_on_cuda_with_the_default_precision(tmp_path, sae):
    result = run_cli(["data=synthetic", f"sae={sae}", "sae.d_sae=512", "data.train_tokens=204800", "logger=none",
                      f"paths.output_dir={tmp_path}", "callbacks.progress_bar.refresh_rate=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_path,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] > 0, metrics
