"""kernels/dispatch.py's choices and checks: Triton only where it computes what the run asked for (float32), a
machine Triton cannot launch on named before the first step, SAELAB_KERNELS refused by name before any set-up,
and the torch fallback as free of host reads as the Triton path where it runs on an accelerator."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from saelab.errors import ConfigError
from saelab.kernels import dispatch
from saelab.run.module import SAEModule
from saelab.saes import build_sae
from tests.conftest import run_cli
from tests.test_host_sync import OPTIM, HostReads, member_step


def _on(device: str, dtype: torch.dtype) -> SimpleNamespace:
    """What backend_for reads of a tensor (its device type and dtype), for a device this machine lacks."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype, is_floating_point=lambda: dtype.is_floating_point)


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not installed")
def test_triton_runs_float32_only(monkeypatch):
    """The Triton kernels load, compute and store in float32: a float64 run on CUDA goes to the torch kernels
    (it was sent to Triton and silently computed in float32), and a forced SAELAB_KERNELS=triton is refused."""
    monkeypatch.setenv("SAELAB_KERNELS", "auto")
    assert dispatch.backend_for(_on("cuda", torch.float32), _on("cuda", torch.float32)) == "triton"
    assert dispatch.backend_for(_on("cuda", torch.float64), _on("cuda", torch.float64)) == "torch"
    assert dispatch.backend_for(_on("cuda", torch.float32), _on("cuda", torch.float64)) == "torch"
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    with pytest.raises(ConfigError, match="SAELAB_KERNELS='triton' is not allowed.*float32"):
        dispatch.backend_for(torch.zeros(2, dtype=torch.float64))


def test_an_unknown_kernels_choice_is_one_line_before_any_set_up(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_KERNELS", "cuda")
    out = tmp_path / "outputs"
    result = run_cli(["data=synthetic", "logger=none", f"paths.output_dir={out}", f"hydra.run.dir={out}/run"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == ("error: SAELAB_KERNELS='cuda' is not allowed: expected one of 'auto', "
                                     "'torch', 'triton'")
    assert not out.exists()


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not installed")
def test_a_triton_that_cannot_launch_is_named_before_the_first_step(monkeypatch, tmp_path):
    """Triton builds its launcher with a C compiler and compiles for the GPU it finds; either can fail. The
    module launches one tiny kernel at fit start, so the run stops before its first step with the way out."""
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    tk = dispatch.triton_kernels()

    def cannot_launch(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(tk, "relu_forward", cannot_launch)
    dispatch._launch_failure.cache_clear()
    module = SAEModule.single(build_sae({"_target_": "saelab.saes.relu.ReluSAE", "d_in": 8, "d_sae": 16}), OPTIM,
                              max_steps=2, dead_window_tokens=50)
    steps = []
    monkeypatch.setattr(module, "training_step", lambda *a: steps.append(1))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    try:
        with pytest.raises(ConfigError, match=r"SAELAB_KERNELS='triton' is not allowed: expected 'torch' on cpu: "
                                              r"Triton could not launch a kernel here \(RuntimeError: Failed to find"):
            trainer.fit(module, DataLoader([torch.randn(4, 8)] * 2, batch_size=None))
    finally:
        dispatch._launch_failure.cache_clear()
    assert steps == []


@pytest.mark.parametrize("kernel", ["rectangle", "triangle"])
def test_the_torch_fallback_jumprelu_step_reads_nothing_back_off_the_cpu(monkeypatch, kernel):
    """SAELAB_KERNELS=torch on an accelerator (or a float64 run there): JumpReLU's step read theta's minimum
    (bool) and listed the kernel window's entries (nonzero) every step. Off the CPU it now keeps the bool mask
    and a dense window, with the same gradients as the CPU's listed window."""
    monkeypatch.setenv("SAELAB_KERNELS", "torch")
    cfg = {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "d_in": 16, "d_sae": 64, "sparsity_coefficient": 0.1,
           "bandwidth": 0.5, "kernel": kernel}
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))

    def gradients(sync_free: bool) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(dispatch, "host_sync_free", lambda t: sync_free)
        torch.manual_seed(0)
        sae = build_sae(cfg)
        sum(sae.training_loss(x, {"sparsity": 0.1}).terms.values()).backward()
        return {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}

    listed, dense = gradients(False), gradients(True)
    assert listed.keys() == dense.keys() and {"W_enc", "b_enc"} <= dense.keys()
    assert any("threshold" in name for name in dense)
    for name in listed:
        torch.testing.assert_close(dense[name], listed[name], rtol=1e-5, atol=1e-6)

    from saelab.run.member import SAEMember

    monkeypatch.setattr(dispatch, "host_sync_free", lambda t: True)
    sae = build_sae(cfg)
    member = SAEMember(sae, OPTIM, max_steps=10, dead_window_tokens=50)
    member.deferred_checks = True
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    member_step(member, optimizer, x, 0)
    with HostReads() as reads:
        member_step(member, optimizer, x, 1)
    assert reads.seen == []
