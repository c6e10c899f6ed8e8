"""TopK-family work at GPU shapes, checked on the CPU (issue 24, items 7-9).

- The bf16 screen is a CPU float32 device: it is decided before its [B, d_sae] buffer exists, so a GPU step (or
  any tensor the CPU kernels cannot take) never allocates one; the CPU's flags are read from /proc/cpuinfo once.
- Every torch.topk call sees at most TOPK_MAX_ELEMENTS entries (PyTorch's CUDA topk leaves its multi-block
  kernel beyond 32-bit index math), and the chunked selection equals one topk.
- AuxK on a GPU step (fixed shapes) takes no more entries per token than the host's bound on the dead latents,
  with the same loss and gradients; Matryoshka decodes its B*k entries once for all levels, not once per level.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saelab.kernels import native
from saelab.saes import build_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread

TARGETS = {"topk": "saelab.saes.topk.TopKSAE", "batchtopk": "saelab.saes.batchtopk.BatchTopKSAE",
           "matryoshka": "saelab.saes.matryoshka_batchtopk.MatryoshkaBatchTopKSAE"}


def make_sae(variant: str = "topk", **overrides):
    torch.manual_seed(0)
    return build_sae({"_target_": TARGETS[variant], "d_in": 16, "d_sae": 64, "k": 4} | overrides)


# -- item 9: CPU-only work stays on the CPU ---------------------------------------------------------------------

def screen_buffers(sae) -> list[str]:
    return [name for name, buf in sae.__dict__.get("_workspace", {}).items() if buf.dtype == torch.bfloat16]


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_the_bf16_screen_is_never_tried_off_the_cpu(variant, monkeypatch):
    """A CPU with bf16 dot products (faked) and a tensor elsewhere (the meta device stands for CUDA: no data, the
    same allocation): no bf16 buffer is made and the screen is not asked. Before, screened_select allocated its
    [B, d_sae] bf16 workspace on the tensor's device first and only then found the screen could not run."""
    monkeypatch.setattr(native, "fast_bf16", lambda: True)
    asked = []
    monkeypatch.setattr(native, "bf16_screen", lambda *a, **k: asked.append(1))
    sae = make_sae(variant).to("meta")
    x = torch.empty(32, 16, device="meta")
    assert sae.screened_select(x, torch.empty(64, device="meta")) is None
    assert screen_buffers(sae) == [] and asked == []


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_a_step_on_the_gpu_kernels_allocates_no_screen(variant, monkeypatch):
    """A whole training step on the GPU's kernels (Triton, in its interpreter here): no bf16 buffer. On the CPU
    in float32 with the native kernels the screen still runs (the check is not vacuous)."""
    monkeypatch.setattr(native, "fast_bf16", lambda: True)
    x = torch.randn(32, 16)
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    sae = make_sae(variant)
    sae.training_loss(x, {})
    assert screen_buffers(sae) == []
    monkeypatch.setenv("SAELAB_KERNELS", "auto")
    if native.library() is None:
        pytest.skip("no C++ compiler: the native kernels (and so the screen) are off here")
    sae.training_loss(x, {})
    assert screen_buffers(sae) == ["screen"] and sae.screen_candidates_per_token is not None


def test_cpu_flags_are_read_once(monkeypatch):
    """fast_bf16 and the kernels' cache key ask for the CPU's flags; /proc/cpuinfo is read at most once."""
    if hasattr(native._cpu_flags, "cache_clear"):
        native._cpu_flags.cache_clear()
    reads = []
    read_text = Path.read_text

    def counting(self, *args, **kwargs):
        if str(self) == "/proc/cpuinfo":
            reads.append(1)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    flags = [native._cpu_flags() for _ in range(5)]
    assert len(set(flags)) == 1 and len(reads) <= 1
