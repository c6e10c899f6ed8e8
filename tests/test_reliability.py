"""Failures lose nothing: non-finite losses stop (or skip) cleanly, no non-finite weights are written, and
the writes that matter are atomic."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from saelab.io import atomic_write, write_json
from saelab.run.module import SAEModule
from saelab.saes import build_sae
from tests.conftest import optim_config, run_cli, tiny_overrides

OPTIM = optim_config(lr=1e-3, betas=None, lr_warmup_steps=0, lr_warmup="linear", lr_decay_fraction=0.0)


def _module(nan_policy: str, deferred: bool = False) -> SAEModule:
    """deferred: the finite check a GPU step makes (noted on the device, read later; nonfinite.py), forced here."""
    torch.manual_seed(0)
    sae = build_sae({"_target_": "saelab.saes.relu.ReluSAE", "d_in": 8, "d_sae": 32, "sparsity_coefficient": 0.01})
    module = SAEModule.single(sae, OPTIM, max_steps=6, dead_window_tokens=1000, nan_policy=nan_policy)
    module.member.deferred_checks = deferred
    return module


def _batches(bad_index: int | None) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 8, generator=generator) for _ in range(6)]
    if bad_index is not None:
        batches[bad_index][3, 2] = float("nan")
    return DataLoader(batches, batch_size=None)


def _trainer(tmp_path: Path, callbacks=(), steps: int = 6) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                  filename="step{step}", auto_insert_metric_name=False)
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[*callbacks, checkpoints], default_root_dir=tmp_path, accelerator="cpu")


def _all_checkpoints_finite(directory: Path) -> list[int]:
    steps = []
    for path in sorted(directory.glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()), path
        steps.append(int(ckpt["global_step"]))
    return steps


@pytest.mark.parametrize("deferred", [False, True])
def test_nan_loss_stops_naming_the_step_and_term(tmp_path, deferred):
    """Deferred, the record is read before every checkpoint (one per step here), so the run stops at once too."""
    module = _module("stop", deferred)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2: term\(s\) rec, sparsity"):
        _trainer(tmp_path).fit(module, train_dataloaders=_batches(bad_index=2))
    assert _all_checkpoints_finite(tmp_path / "ckpt") == [1, 2]  # the steps before the bad batch


@pytest.mark.parametrize("deferred", [False, True])
def test_nan_loss_skips_the_batch_when_configured(tmp_path, deferred):
    """Deferred, fused Adam skips the update on the device (found_inf) and the record counts the batch."""
    module = _module("skip", deferred)
    before = {k: v.clone() for k, v in module.sae.state_dict().items()}
    trainer = _trainer(tmp_path)
    trainer.fit(module, train_dataloaders=_batches(bad_index=2))
    # Six batches, one skipped: Adam updated the weights five times (Lightning still counts six steps).
    assert int(trainer.optimizers[0].state[module.sae.W_dec]["step"]) == 5
    assert int(module.member.skipped_batches) == 1
    assert not torch.equal(module.sae.W_dec, before["W_dec"])  # the other batches did train
    assert all(torch.isfinite(p).all() for p in module.sae.parameters())
    assert _all_checkpoints_finite(tmp_path / "ckpt") == [1, 2, 3, 4, 5, 6]


class _BatchCounter(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args) -> None:
        self.batches += 1


def test_deferred_nan_check_reports_at_the_next_logging_step_with_the_bad_step(tmp_path):
    """No checkpoints: a NaN at step 1 is reported at the logging step 4 (log_every_n_steps=5), naming step 1;
    the bad batch's update was skipped on the device, so the weights stayed finite in between."""
    module = _module("stop", deferred=True)
    counter = _BatchCounter()
    trainer = L.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[counter], log_every_n_steps=5, accelerator="cpu")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1: term\(s\) rec, sparsity"):
        trainer.fit(module, train_dataloaders=_batches(bad_index=1))
    assert counter.batches == 4  # batches 0-3 completed; the logging step (4) read the record and stopped
    assert int(trainer.optimizers[0].state[module.sae.W_dec]["step"]) == 3  # 0, 2 and 3 updated; 1 skipped
    assert all(torch.isfinite(p).all() for p in module.sae.parameters())


def test_deferred_nan_skips_the_whole_accumulated_update(tmp_path):
    """accumulate_grad_batches=2: a NaN in the first batch of a pair still skips the pair's update (the device flag
    is or-ed until the optimiser steps), so three pairs give two updates and finite weights."""
    module = _module("skip", deferred=True)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accumulate_grad_batches=2, accelerator="cpu")
    trainer.fit(module, train_dataloaders=_batches(bad_index=2))
    assert int(trainer.optimizers[0].state[module.sae.W_dec]["step"]) == 2
    assert int(module.member.skipped_batches) == 1
    assert all(torch.isfinite(p).all() for p in module.sae.parameters())


class _CorruptWeights(L.Callback):
    """Puts a NaN in the decoder at step 3, before the checkpoint callback (Lightning runs it last) saves."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            with torch.no_grad():
                pl_module.sae.W_dec[0, 0] = float("nan")


def test_non_finite_weights_are_never_written(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite weights at step 3 in sae.W_dec: no checkpoint written"):
        _trainer(tmp_path, callbacks=[_CorruptWeights()]).fit(_module("stop"), train_dataloaders=_batches(None))
    assert _all_checkpoints_finite(tmp_path / "ckpt") == [1, 2]


def test_lightning_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while the checkpoint file is written leaves the previous checkpoint intact."""
    import fsspec.implementations.local as local

    trainer = _trainer(tmp_path, steps=2)
    module = _module("stop")
    trainer.fit(module, train_dataloaders=_batches(None))
    path = tmp_path / "ckpt" / "last.ckpt"
    trainer.save_checkpoint(path)
    good = path.read_bytes()

    def crash_half_way(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        raise OSError("disk gone")

    system_tmp = tmp_path / "system_tmp"  # fsspec stages the new file with tempfile.mkstemp() here
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    before = sorted(os.listdir(path.parent))
    monkeypatch.setattr(local.LocalFileOpener, "write", crash_half_way)
    with torch.no_grad():
        module.sae.W_dec.mul_(2)
    with pytest.raises(OSError, match="disk gone"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == good
    assert sorted(os.listdir(path.parent)) == before and not os.listdir(system_tmp)  # no partial leftovers


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"fvu": 0.1})

    def fails_half_way(tmp: Path) -> None:
        tmp.write_text('{"fvu": 0.')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, fails_half_way)
    assert json.loads(path.read_text()) == {"fvu": 0.1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.slow
def test_cli_run_that_diverges_stops_with_one_line_and_keeps_its_finite_checkpoints(
    tiny_model_dir, tiny_corpus_dir, tmp_path
):
    out = tmp_path / "outputs"
    result = run_cli([*tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "optim.lr=1e30",
                      "optim.lr_warmup_steps=0", "callbacks.model_checkpoint.every_n_train_steps=1"], timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "non-finite loss at step" in errors[0] and "term(s) rec" in errors[0], errors
    (run_dir,) = {p.parent for p in out.rglob("checkpoints")}
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "sae").exists()
    assert "FloatingPointError" in (run_dir / "error.txt").read_text()
    assert _all_checkpoints_finite(run_dir / "checkpoints")  # the steps before the loss overflowed


@pytest.mark.slow
def test_compile_switch_gives_the_eager_loss_and_gradients_under_bf16_autocast():
    """`compile=true` (torch.compile of the training loss, inductor here on CPU) is a speed switch only."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        sae = build_sae({"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "d_in": 8, "d_sae": 32})
        module = SAEModule.single(sae, OPTIM, max_steps=6, dead_window_tokens=1000, compile=compiled)
        # the switch really changes the function that runs (bound methods compare equal with ==, not `is`)
        assert (module.member._training_loss == sae.training_loss) != compiled
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = module.member.step_loss(x, {"sparsity": 0.01})
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in sae.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
