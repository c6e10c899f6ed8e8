"""A GPU step never waits for the host: no operation whose result size or value must reach the CPU runs in a
non-logging training step, for any variant, on the kernels a GPU runs (Triton's, here in its interpreter).

On the CPU nothing synchronises, so the check watches for the operations that do on a GPU: reading a value
(.item(), bool(), int(), float(), .tolist()) and data-dependent shapes (nonzero, boolean indexing, bincount,
unique, masked_select). tests/test_cuda.py checks the same on a GPU with torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import copy
import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from saelab.run.member import SAEMember
from saelab.saes import build_sae
from tests.conftest import optim_config

READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "equal", "allclose"}
DATA_SHAPED = {"nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select"}
D_IN, D_SAE, BATCH = 16, 64, 16
OPTIM = optim_config(lr=1e-3, betas=None, lr_warmup_steps=0, lr_warmup="linear", lr_decay_fraction=0.0)
VARIANTS = {
    "relu": {"_target_": "saelab.saes.relu.ReluSAE", "sparsity_coefficient": 0.1},
    "gated": {"_target_": "saelab.saes.gated.GatedSAE", "sparsity_coefficient": 0.1},
    # sae.target_l0's controller (run/l0_control.py) updates lambda on the device every step
    "gated_target_l0": {"_target_": "saelab.saes.gated.GatedSAE", "sparsity_coefficient": 0.1, "target_l0": 4},
    "jumprelu": {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "sparsity_coefficient": 0.1, "bandwidth": 0.1},
    "topk": {"_target_": "saelab.saes.topk.TopKSAE", "k": 4, "k_aux": 8, "dead_window_tokens": 50},
    "batchtopk": {"_target_": "saelab.saes.batchtopk.BatchTopKSAE", "k": 4, "k_aux": 8, "dead_window_tokens": 50},
    "matryoshka_batchtopk": {"_target_": "saelab.saes.matryoshka_batchtopk.MatryoshkaBatchTopKSAE", "k": 4,
                             "k_aux": 8, "dead_window_tokens": 50, "matryoshka_widths": [16, 64]},
    "topk_skip_transcoder": {"_target_": "saelab.saes.topk.TopKSAE", "k": 4, "k_aux": 8, "dead_window_tokens": 50,
                             "d_out": D_IN, "skip": True},
}


class HostReads(TorchFunctionMode):
    """Records the syncing operations called from outside Triton's interpreter (which converts to numpy)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if self.syncs(name, args, kwargs) and not self.inside_triton():
            where = next((f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"
                          for frame in reversed(traceback.extract_stack()[:-1]) if "/saelab/" in frame.filename), "?")
            self.seen.append(f"{name} at {where}")
        return func(*args, **kwargs)

    @staticmethod
    def syncs(name: str, args: tuple, kwargs: dict) -> bool:
        if name in READS or name in DATA_SHAPED:
            return True
        if name in ("__getitem__", "__setitem__") and len(args) > 1:  # a boolean-mask index
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if name == "repeat_interleave":  # tensor repeats without output_size
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        return False

    @staticmethod
    def inside_triton() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if "/triton/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False


def test_the_detector_sees_what_would_synchronise():
    x = torch.randn(8)
    with HostReads() as reads:
        _ = x[x > 0], x.sum().item(), bool(x.max() > 0), x.nonzero(), x.topk(2), torch.where(x > 0, x, 0.0)
    assert [s.split(" ")[0] for s in reads.seen] == ["__getitem__", "item", "__bool__", "nonzero"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_non_logging_steps_read_nothing_back(variant, monkeypatch):
    """Steps 2 and 3 of a member on the GPU's kernels (Triton, deferred finite checks): the loss, its backward, the
    decoder projection, fused Adam and the renormalisation never read a device value, with dead latents so that
    AuxK runs. The first steps may (warm-up: the first logging step reads the finite-check record)."""
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    torch.manual_seed(0)
    sae = build_sae({"d_in": D_IN, "d_sae": D_SAE, **VARIANTS[variant]})
    member = SAEMember(sae, OPTIM, max_steps=10, dead_window_tokens=50)
    member.deferred_checks = True
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    structured = torch.randn(D_IN, D_IN) / D_IN**0.5
    with torch.no_grad():
        sae.tokens_since_fired[::3] = 100  # a third dead: AuxK runs
        sae.tokens_seen.fill_(100)

    def step(index: int) -> None:
        member_step(member, optimizer, torch.randn(BATCH, D_IN) @ structured, index)

    step(0)
    step(1)
    with HostReads() as reads:
        for index in (2, 3):
            step(index)
    assert reads.seen == []
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def member_step(member: SAEMember, optimizer: torch.optim.Optimizer, x: torch.Tensor, index: int) -> None:
    """One training step as SAEModule runs it (index 0 a logging step): the loss (a transcoder predicts x rolled by
    one), backward, the decoder projection, fused Adam told of a non-finite loss, the renormalisation."""
    sae = member.sae
    target = x.roll(1, dims=1) if sae.transcoder else None
    loss, _ = member.step_loss(x, member.coefficients(index), index, with_l0=index == 0, target=target)
    loss.backward()
    sae.before_optimizer_step()
    optimizer.found_inf = member.watch.last_bad.float()
    optimizer.step()
    sae.after_optimizer_step()
    optimizer.zero_grad(set_to_none=True)


def test_auxk_is_skipped_exactly_while_no_latent_can_be_dead(monkeypatch):
    """The GPU path proves on the host that nothing is dead (the counters' maximum read on a logging step plus the
    tokens since), and skips AuxK's fixed-shape work only then; unproven (before the first read, after a load), it
    runs, and gives zero where nothing is dead; once latents are dead it equals the CPU path's term."""
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    torch.manual_seed(0)
    sae = build_sae({"d_in": D_IN, "d_sae": D_SAE, **VARIANTS["topk"], "dead_window_tokens": 4 * BATCH})
    member = SAEMember(sae, OPTIM, max_steps=10, dead_window_tokens=4 * BATCH)
    member.deferred_checks = True
    calls = []
    original = type(sae).masked_auxk_loss
    monkeypatch.setattr(type(sae), "masked_auxk_loss", lambda self, *a: calls.append(1) or original(self, *a))
    x = torch.randn(BATCH, D_IN)

    def auxk(step: int, logging: bool) -> float:
        _, out = member.step_loss(x, {}, step, with_l0=logging)
        return float(out.terms["auxk"])

    assert auxk(0, logging=False) == 0 and calls == [1]  # unknown bound: computed (nothing dead: zero)
    assert auxk(1, logging=True) == 0 and calls == [1, 1]  # the logging step reads the bound (after its AuxK)
    assert sae.none_dead(4 * BATCH)
    with torch.no_grad():  # the same input every step: the latents that never fire go dead after the window
        never_fired = int((sae.tokens_since_fired >= 2 * BATCH).sum())
    assert never_fired > 0
    assert auxk(2, logging=False) == 0 and calls == [1, 1]  # proven: skipped (the max is 2 batches < 4)
    assert auxk(3, logging=False) == 0 and calls == [1, 1]  # 3 batches < 4
    assert not sae.none_dead(4 * BATCH)  # 4 batches: the latents that never fired are dead
    cpu_sae = copy.deepcopy(sae)
    value = auxk(4, logging=False)
    assert value > 0 and calls == [1, 1, 1]
    monkeypatch.setenv("SAELAB_KERNELS", "auto")  # the CPU path: the dead latents' ids, then their top k_aux
    expected = cpu_sae.training_loss(x, {}).terms["auxk"]
    torch.testing.assert_close(torch.tensor(value), expected.detach(), rtol=1e-5, atol=1e-6)
    sae.load_state_dict(sae.state_dict())
    assert not sae.none_dead(4 * BATCH)  # a load forgets the bound


def test_training_through_lightning_reads_nothing_back_between_logging_steps(monkeypatch, tmp_path):
    """The same promise through Trainer.fit, as saelab-train runs it (progress bar on, logging every 4 steps):
    Lightning's loop, its progress bar and the module's hooks read no device value on a non-logging step. The
    bar shows floats read on logging steps; `self.log(..., prog_bar=True)` would have Lightning `.item()` the
    cached tensor at every batch end."""
    import lightning as L
    from torch.utils.data import DataLoader

    from saelab.run.module import SAEModule

    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    torch.manual_seed(0)
    module = SAEModule.single(build_sae({"d_in": D_IN, "d_sae": D_SAE, **VARIANTS["topk"]}), OPTIM, max_steps=12,
                              dead_window_tokens=50)
    module.member.deferred_checks = True
    reads, starts = HostReads(), []

    class BatchStarts(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append(len(reads.seen))

    trainer = L.Trainer(max_steps=12, log_every_n_steps=4, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[BatchStarts()], default_root_dir=tmp_path,
                        accelerator="cpu")
    batches = DataLoader([torch.randn(BATCH, D_IN) for _ in range(12)], batch_size=None)
    with reads:
        trainer.fit(module, batches)
    per_batch = [reads.seen[a:b] for a, b in zip(starts, [*starts[1:], len(reads.seen)], strict=True)]
    assert len(per_batch) == 12
    logging = {3, 7, 11}  # (global_step + 1) % 4 == 0
    assert {i: seen for i, seen in enumerate(per_batch) if i >= 2 and i not in logging and seen} == {}
    assert set(module.progress) == {"loss", "tok/s"}
