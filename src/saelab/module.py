"""The LightningModule that trains any SAE variant through the contract in saes/base.py.

It knows nothing variant-specific: it sums the named loss terms, schedules the named coefficients,
applies the unit-norm decoder constraint, and keeps the dead-latent statistics.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from saelab.allocator import keep_freed_memory
from saelab.errors import check_choice
from saelab.saes.base import SAE, TrainStep

log = logging.getLogger(__name__)
NAN_POLICIES = ("stop", "skip")


def lr_factor(step: int, max_steps: int, warmup_steps: int, warmup: str, decay_fraction: float) -> float:
    """Warm-up from 0.1 lr (linear or cosine), then constant, then linear decay to 0 over the final fraction."""
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        t = step / warmup_steps
        shape = t if warmup == "linear" else 0.5 * (1 - math.cos(math.pi * t))
        factor = 0.1 + 0.9 * shape
    decay_steps = int(decay_fraction * max_steps)
    if decay_steps > 0 and step >= max_steps - decay_steps:
        factor *= max(0.0, (max_steps - step) / decay_steps)
    return factor


class SAEModule(L.LightningModule):
    def __init__(self, sae: SAE, optim: Mapping[str, Any], max_steps: int, dead_window_tokens: int,
                 nan_policy: str = "stop", compile: bool = False):
        """`nan_policy`: what a non-finite loss term does: "stop" raises FloatingPointError naming the step and
        the term; "skip" drops that batch (no backward, no optimiser step) and logs a warning.
        `compile`: run the SAE's training loss through torch.compile (fuses the elementwise work of the
        autograd path, which is what runs under bf16 autocast on CUDA)."""
        super().__init__()
        check_choice("nan_policy", nan_policy, NAN_POLICIES)
        self.nan_policy = nan_policy
        self.sae = sae
        self._training_loss = torch.compile(sae.training_loss, dynamic=False) if compile else sae.training_loss
        self.optim_cfg = dict(optim)
        self.max_steps = int(max_steps)
        self.dead_window_tokens = int(dead_window_tokens)
        # The normalisation scale C: saved in checkpoints, folded into the exported SAE.
        self.register_buffer("norm_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("skipped_batches", torch.zeros((), dtype=torch.long))
        self._step_times: deque[tuple[float, int]] = deque(maxlen=21)

    def coefficients(self) -> dict[str, float]:
        step = self.global_step
        return {
            name: value * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
            for name, (value, warmup) in self.sae.scheduled_coefficients.items()
        }

    def step_loss(self, batch: Tensor, coefficients: dict[str, float], with_l0: bool = True
                  ) -> tuple[Tensor, TrainStep]:
        """The per-step work besides the optimiser: the SAE's loss terms, their sum, dead-latent bookkeeping,
        and (if `with_l0`, i.e. on logging steps) the batch's L0 as `extras["l0"]`.

        benchmarks/train_step.py calls this too, so it measures exactly what training runs.
        """
        out = self._training_loss(batch, coefficients)
        loss = sum(out.terms.values())
        if not torch.isfinite(loss):
            bad = [name for name, term in out.terms.items() if not torch.isfinite(term)]
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: term(s) {', '.join(bad)}")
        with torch.no_grad():
            fired, n_tokens = out.fired(), out.n_tokens
            active = out.active_count() if with_l0 else None
            if self._distributed():  # every rank keeps the same statistics: those of the global batch
                fired = fired.to(torch.int32)
                torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
                if active is not None:
                    active = active.to(torch.int64)
                    torch.distributed.all_reduce(active)
                n_tokens *= torch.distributed.get_world_size()
            self.sae.record_fired(fired.bool(), n_tokens)
            if active is not None:
                out.extras["l0"] = active.float() / n_tokens  # logged as train/l0
        return loss, out

    def _logging_step(self) -> bool:
        """Steps whose metrics reach the loggers (Trainer.log_every_n_steps); L0 is computed only on those."""
        if self._trainer is None:
            return True
        # Lightning writes step metrics when (steps done before this one + 1) % log_every_n_steps == 0.
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized() and (
            torch.distributed.get_world_size() > 1)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor | None:
        coefficients = self.coefficients()
        logging_step = self._logging_step()
        try:
            loss, out = self.step_loss(batch, coefficients, with_l0=logging_step)
        except FloatingPointError as err:
            if self.nan_policy == "stop":
                raise
            log.warning("%s: batch skipped (nan_policy=skip)", err)
            self.log("train/skipped_batches", float(self.skipped_batches.add_(1)), on_step=True, on_epoch=False)
            return None  # Lightning runs no backward and no optimiser step for this batch
        self._step_times.append((time.perf_counter(), batch.shape[0]))
        if logging_step:  # each self.log call has a cost, so only what reaches the loggers is logged
            self.log_dict(self._step_metrics(batch, out, coefficients), on_step=True, on_epoch=False)
            self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
            self._log_throughput()
        return loss

    def _step_metrics(self, batch: Tensor, out: TrainStep, coefficients: dict[str, float]) -> dict[str, Any]:
        """What a logging step sends to the loggers: loss terms, coefficients, the SAE's extras, L0, FVU, dead."""
        logs = {f"loss/{name}": term.detach() for name, term in out.terms.items()}
        logs |= {f"coef/{name}": value for name, value in coefficients.items()}
        logs |= {f"train/{name}": value.detach() for name, value in out.extras.items()}
        if "rec" in out.terms:  # FVU of this batch, about its own mean
            variance = (batch - batch.mean(0)).pow(2).sum(-1).mean()
            logs["train/fvu"] = out.terms["rec"].detach() / variance
        logs["lr"] = self.optimizers().param_groups[0]["lr"]
        logs["train/dead_fraction"] = self.sae.dead_mask(self.dead_window_tokens).float().mean()
        return logs

    def _log_throughput(self) -> None:
        """Tokens/s over the last 20 steps, data generation included (what the run actually achieves)."""
        if len(self._step_times) > 1:
            (t0, _), (t1, _) = self._step_times[0], self._step_times[-1]
            tokens = sum(n for _, n in list(self._step_times)[1:])
            self.log("tok/s", tokens / max(t1 - t0, 1e-9), prog_bar=True, on_step=True, on_epoch=False)

    def on_fit_start(self) -> None:
        keep_freed_memory()  # a step's fresh tensors then reuse freed memory instead of page-faulting anew

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Never write non-finite weights: a checkpoint must be something a run can safely resume from."""
        bad = [name for name, value in checkpoint["state_dict"].items()
               if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise FloatingPointError(f"non-finite weights at step {self.global_step} in {', '.join(bad)}: "
                                     "no checkpoint written")

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.before_optimizer_step()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.after_optimizer_step()

    def configure_optimizers(self):
        cfg = self.optim_cfg
        betas = tuple(cfg["betas"]) if cfg.get("betas") is not None else self.sae.recipe_adam_betas
        # torch's fused Adam kernel: one vectorised pass per parameter, ~8x the per-tensor loop on CPU.
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=float(cfg["lr"]), betas=betas,
                                     fused=bool(cfg.get("fused", True)))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, self.max_steps, int(cfg["lr_warmup_steps"]), str(cfg["lr_warmup"]),
                                   float(cfg["lr_decay_fraction"])),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
