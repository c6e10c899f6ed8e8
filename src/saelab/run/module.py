"""The LightningModule that trains SAEs in lockstep on one activation stream (run/member.py: one SAE each).

A plain run is a group of one; `hydra/launcher=fanout` makes groups of several jobs that share a model forward
(saelab.run.training). One optimiser serves the group: Adam with one parameter group per member (its own lr,
betas and state), and one LambdaLR with one schedule per member. The members' losses are summed for one backward;
their parameters are disjoint, so each member's gradient is exactly the one its own backward would give.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from saelab.kernels.dispatch import check_launch
from saelab.run.allocator import keep_freed_memory
from saelab.run.member import SAEMember
from saelab.run.progress import replacing_default_bar
from saelab.saes.base import SAE

log = logging.getLogger(__name__)


class SAEModule(L.LightningModule):
    def __init__(self, members: Sequence[SAEMember]):
        super().__init__()
        if not members:
            raise ValueError("SAEModule needs at least one member")
        self.members = nn.ModuleList(members)
        self._stepping: list[SAEMember] = list(members)  # members that take part in the current optimiser step
        self.progress: dict[str, float] = {}  # what the progress bar shows, read on logging steps only

    @classmethod
    def single(cls, sae: SAE, optim: Mapping[str, Any], max_steps: int, dead_window_tokens: int,
               nan_policy: str = "stop", compile: bool = False) -> SAEModule:
        """A group of one that takes plain tensor batches (tests and benchmarks)."""
        return cls([SAEMember(sae, optim, max_steps, dead_window_tokens, nan_policy, compile)])

    def alive_members(self) -> list[bool]:
        """Which members still train (the checkpoint I/O writes only theirs)."""
        return [m.alive for m in self.members]

    @property
    def member(self) -> SAEMember:
        """The member of a one-member module."""
        (member,) = self.members
        return member

    @property
    def sae(self) -> SAE:
        """The SAE of a one-member module."""
        return self.member.sae

    def _attached(self) -> bool:
        """Whether a Trainer runs this module (tests and benchmarks also step it by hand)."""
        try:
            return self.trainer is not None
        except RuntimeError:  # Lightning's "is not attached to a `Trainer`"
            return False

    def _logging_step(self) -> bool:
        """Steps whose metrics reach the loggers (Trainer.log_every_n_steps); L0 is computed only on those."""
        if not self._attached():
            return True
        # Lightning writes step metrics when (steps done before this one + 1) % log_every_n_steps == 0.
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized() and (
            torch.distributed.get_world_size() > 1)

    def training_step(self, batch: Tensor | Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        logging_step, step = self._logging_step(), self.global_step
        self._stepping = [m for m in self.members if m.alive]
        total: Tensor | None = None
        for index, member in enumerate(self.members):
            if not member.alive:
                continue
            x, target = member.input_and_target(batch)
            coefficients = member.coefficients(step)
            try:
                with member.autocast(x.device.type):
                    loss, out = member.step_loss(x, coefficients, step, logging_step, self._distributed(), target)
            except FloatingPointError as err:
                self._non_finite(member, err)
                continue
            member.record_batch(x.shape[0])
            if logging_step:  # the loggers' cost is paid only on the steps they write
                lr = (self.optimizers().param_groups[index]["lr"] if self._attached()
                      else float(member.optim_cfg["lr"]))
                member.log_metrics(member.step_metrics(x if target is None else target, loss, out, coefficients, lr),
                                   self._log_step())
            total = loss if total is None else total + loss
        if not any(m.alive for m in self.members):  # nothing left to train: end the run with the first failure
            raise next(m.failure for m in self.members)
        self._skip_update_if_non_finite()
        if logging_step and total is not None:  # the progress bar (saelab.run.progress): summed loss, tokens/s
            self.progress["loss"] = float(total.detach())
            rates = [r for m in self.members if m.alive and (r := m.tokens_per_s()) is not None]
            if rates:
                self.progress["tok/s"] = min(rates)
        return total  # None: every member skipped this batch (Lightning then runs no backward)

    def _skip_update_if_non_finite(self) -> None:
        """Hand this step's deferred non-finite flag to fused Adam (`found_inf`): it then skips the update on the
        device, for the whole group (one member's bad batch costs the others that batch's update)."""
        flags = [m.watch.last_bad for m in self._stepping if m.alive and m.watch.last_bad is not None]
        for member in self.members:
            member.watch.last_bad = None
        if not flags or not self._attached():  # nothing deferred this step (the CPU's immediate check)
            return
        optimizer = self.optimizers().optimizer
        if not all(group.get("fused") for group in optimizer.param_groups):  # found_inf is fused Adam's alone
            for member in self.members:
                member.deferred_checks = False
            return
        # Or-ed over accumulated batches until the optimiser steps (optimizer_step clears it).
        bad = torch.stack(flags).any().float()
        earlier = getattr(optimizer, "found_inf", None)
        optimizer.found_inf = bad if earlier is None else torch.maximum(earlier, bad)

    def read_deferred_checks(self) -> None:
        """Read every member's record now (before a checkpoint, at the end of training): a bad step after the
        last logging step is reported too."""
        for member in self.members:
            if member.alive:
                try:
                    member.read_watch()
                except FloatingPointError as err:
                    self._non_finite(member, err)

    def on_train_end(self) -> None:
        self.read_deferred_checks()

    def _non_finite(self, member: SAEMember, err: FloatingPointError) -> None:
        if member.nan_policy == "stop" or self._distributed():  # a rank that skipped would hang the others
            member.failure = err
            if len(self.members) > 1:
                log.error("job %s stops: %s (nan_policy=stop); the rest of the group goes on", member.name, err)
            return
        log.warning("%s: batch skipped (nan_policy=skip)", err)
        member.skipped_batches.add_(1)
        member.log_metrics({"train/skipped_batches": float(member.skipped_batches)}, self._log_step())

    def _log_step(self) -> int:
        """The step Lightning's own logging would use: batches stepped before this one (with one optimiser, the
        optimiser steps taken so far)."""
        return self.global_step

    def configure_callbacks(self) -> list[L.Callback]:
        """The progress bar that shows floats read on logging steps (no host read per step through Lightning)."""
        return replacing_default_bar(self.trainer)

    def on_fit_start(self) -> None:
        for member in self.members:  # SAELAB_KERNELS and Triton's launch, checked before the first step
            check_launch(self.device, next(member.sae.parameters()).dtype)
        keep_freed_memory()  # a step's fresh tensors then reuse freed memory instead of page-faulting anew

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Never write non-finite weights: a checkpoint must be something a run can safely resume from.

        A member whose weights went non-finite stops (its job fails, its earlier checkpoints stay); the
        checkpoint I/O (saelab.run.checkpoints) writes only the members still alive."""
        self.read_deferred_checks()
        for member in self.members:
            bad = member.non_finite_weights() if member.alive else []
            if bad:
                member.failure = FloatingPointError(
                    f"non-finite weights at step {self.global_step} in {', '.join(bad)}: no checkpoint written")
        if not any(m.alive for m in self.members):
            raise next(m.failure for m in self.members)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Each member clips its own gradient by its own trainer.gradient_clip_val (by norm)."""
        for member in self._stepping:
            clip = member.gradient_clip_val if member.gradient_clip_val is not None else gradient_clip_val
            if clip:
                torch.nn.utils.clip_grad_norm_(list(member.sae.parameters()), float(clip))

    def on_before_optimizer_step(self, optimizer) -> None:
        for member in self._stepping:
            member.sae.before_optimizer_step()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._attached():
            self.optimizers().optimizer.found_inf = None  # the flag was for the update just made (or skipped)
        for member in self._stepping:
            if member.alive:
                member.sae.after_optimizer_step()

    def configure_optimizers(self):
        groups = [member.param_group() for member in self.members]
        # torch's fused Adam kernel: one vectorised pass per parameter, ~8x the per-tensor loop on CPU.
        optimizer = torch.optim.Adam(groups, fused=all(g["fused"] for g in groups))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [member.lr_lambda for member in self.members])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
