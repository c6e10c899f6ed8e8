"""trainer.precision=auto|tf32 (saelab.run.precision): what each resolves to, what Lightning gets, matmuls."""

from __future__ import annotations

import pytest
import torch

from saelab.run import precision


@pytest.mark.parametrize(("cuda", "accelerator", "expected"), [
    (False, "auto", "32-true"), (True, "auto", "tf32"), (True, "gpu", "tf32"), (True, "cuda", "tf32"),
    (True, "cpu", "32-true"), (False, "gpu", "32-true"),
])
def test_auto_is_tf32_exactly_when_training_runs_on_cuda(cuda, accelerator, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert precision.resolve("auto", accelerator) == expected


@pytest.mark.parametrize("given", ["32-true", "bf16-mixed", "tf32", 32])
def test_explicit_precisions_are_kept(given):
    assert precision.resolve(given, "auto") == given


def test_lightning_gets_32_true_for_tf32_and_torch_gets_tf32_matmuls():
    before = torch.get_float32_matmul_precision()
    try:
        assert precision.lightning_precision("tf32") == "32-true"
        assert precision.lightning_precision("bf16-mixed") == "bf16-mixed"
        precision.apply("tf32")
        assert torch.get_float32_matmul_precision() == "high"
        precision.apply("32-true")
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_lightning_accepts_every_saelab_precision():
    """A Trainer built from trainer.precision=auto or tf32 (as `saelab-cache build` and group.py build one)."""
    import lightning as L

    for given in ("auto", "tf32"):
        trainer = L.Trainer(**precision.for_lightning({"precision": given, "accelerator": "cpu", "max_steps": 1}),
                            logger=False, enable_checkpointing=False)
        assert trainer.precision == "32-true"
