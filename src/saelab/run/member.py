"""One SAE of a training group with everything it trains with: its optimiser settings and learning-rate schedule,
coefficient warm-ups (and the target-L0 controller), dead-latent statistics, normalisation scale, NaN policy and
precision (run/module.py's SAEModule steps every member of a group on each batch).

Nothing here is variant-specific: a member sums the named loss terms of its SAE's `training_loss`, schedules the
named coefficients, applies the decoder constraint and keeps the dead-latent statistics (saes/base.py's contract).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import check_choice
from saelab.run.l0_control import L0ControlConfig, L0Controller
from saelab.run.nonfinite import NonFiniteWatch
from saelab.saes.base import SAE, TrainStep
from saelab.saes.decoder_rescale import weights_once
from saelab.sites import Sites

log = logging.getLogger(__name__)
NAN_POLICIES = ("stop", "skip")
# Precisions a member applies itself (autocast around its own loss); any other runs through Lightning's
# precision plugin and is then the same for the whole group.
MEMBER_PRECISIONS = {"32-true": None, "32": None, 32: None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}


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


class SAEMember(nn.Module):
    """One SAE of a group and its own training state; the group's module steps it."""

    def __init__(self, sae: SAE, optim: Mapping[str, Any], max_steps: int, dead_window_tokens: int,
                 nan_policy: str = "stop", compile: bool = False, hook: str | None = None,
                 precision: str | int = "32-true", gradient_clip_val: float | None = None, name: str = "0",
                 target_hook: str | None = None, l0_control: Mapping[str, Any] | None = None,
                 sites: Sites | None = None):
        """`nan_policy`: what a non-finite loss term does: "stop" ends this member (FloatingPointError naming
        the step and the term; the group goes on without it); "skip" drops its batch (no update) and warns.
        `compile`: run the SAE's training loss through torch.compile (fuses the elementwise work of the
        autograd path, which is what runs under bf16 autocast on CUDA). `hook`: the key of this member's
        activations in a batch (None: batches are plain tensors); `target_hook` the key of a transcoder's
        target activations. `precision`: the member's autocast ("bf16-mixed") or none ("32-true"); `name`
        labels it in log lines (the job number in a sweep). `l0_control`: the l0_control section, the settings
        of sae.target_l0's controller (run/l0_control.py; None: its defaults). `sites`: the sites the SAE reads and
        writes (saelab.sites), in place of `hook` and `target_hook` (a crosscoder's several)."""
        super().__init__()
        check_choice("nan_policy", nan_policy, NAN_POLICIES)
        if sites is None and hook is not None:
            sites = Sites.of(hook, target_hook)
        self.sites = sites  # None: batches are plain tensors
        hook, target_hook = (sites.hook, sites.target_hook) if sites is not None else (None, None)
        self.nan_policy, self.hook, self.target_hook, self.name = nan_policy, hook, target_hook, str(name)
        self.sae = sae
        self._training_loss = torch.compile(sae.training_loss, dynamic=False) if compile else sae.training_loss
        self.optim_cfg = dict(optim)
        self.max_steps = int(max_steps)
        self.dead_window_tokens = int(dead_window_tokens)
        self.autocast_dtype = MEMBER_PRECISIONS.get(precision)
        self.gradient_clip_val = gradient_clip_val
        # The normalisation scale C: saved in checkpoints, folded into the exported SAE.
        self.register_buffer("norm_scale", torch.tensor(1.0, dtype=torch.float64))
        if target_hook is not None:  # a transcoder's target has its own scale, folded into the export's output side
            self.register_buffer("target_scale", torch.tensor(1.0, dtype=torch.float64))
        if sites is not None and sites.several:  # each site its own scale: norm_scale is the first site's
            self.register_buffer("site_scales", torch.ones(len(sites.scaled), dtype=torch.float64))
        self.register_buffer("skipped_batches", torch.zeros((), dtype=torch.long))
        # sae.target_l0: the controller of the sparsity coefficient. Only a variant with a sparsity coefficient
        # is controlled (TopK's k already is its L0).
        target_l0 = getattr(sae.cfg, "target_l0", None) if "sparsity" in sae.scheduled_coefficients else None
        control = L0ControlConfig.from_config(l0_control)
        if control.signed is None:  # the variant's recipe: signed where a negative coefficient is meaningful
            control = dataclasses.replace(control, signed=sae.signed_sparsity_coefficient)
        self.l0_controller = None if target_l0 is None else L0Controller(
            target_l0, control,
            start_step=int(getattr(sae.cfg, "sparsity_warmup_steps", 0)), max_steps=self.max_steps)
        self.loggers: list = []  # this member's experiment loggers (one W&B run / CSV file per job)
        self.failure: BaseException | None = None  # set when the member stops (its job then fails alone)
        # Non-finite losses on an accelerator are noted on the device and read on logging steps (nonfinite.py);
        # None: decided per batch (deferred off the CPU), the module turns it off where Adam is not fused.
        self.deferred_checks: bool | None = None
        self.watch = NonFiniteWatch()
        self._step_times: deque[tuple[float, int]] = deque(maxlen=21)

    def input_and_target(self, batch: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The SAE's input and a transcoder's target from a batch ({site: tensor}, or a plain tensor)."""
        if not isinstance(batch, Mapping):
            return batch, None
        return self.sites.input(batch), self.sites.target(batch)

    @property
    def target_l0(self) -> float | None:
        """sae.target_l0 where a controller adapts the sparsity coefficient to it, else None."""
        return None if self.l0_controller is None else self.l0_controller.target

    @property
    def alive(self) -> bool:
        return self.failure is None

    def coefficients(self, step: int = 0) -> dict[str, float | Tensor]:
        """The scheduled coefficients at `step`; under sae.target_l0 the sparsity one times the controller's gain
        (a device scalar, so reading it costs no host synchronisation)."""
        values: dict[str, float | Tensor] = {
            name: value * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
            for name, (value, warmup) in self.sae.scheduled_coefficients.items()
        }
        if self.l0_controller is not None and "sparsity" in values:
            values["sparsity"] = values["sparsity"] * self.l0_controller.gain.float()
        return values

    def autocast(self, device_type: str):
        """The member's mixed-precision context for its forward (none in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def step_loss(self, batch: Tensor, coefficients: dict[str, float], step: int = 0, with_l0: bool = True,
                  distributed: bool = False, target: Tensor | None = None) -> tuple[Tensor, TrainStep]:
        """The per-step work besides the optimiser: the SAE's loss terms, their sum, dead-latent bookkeeping,
        and (if `with_l0`, i.e. on logging steps) the batch's L0 as `extras["l0"]`. `target`: a transcoder's.

        benchmarks/train_step.py calls this too, so it measures exactly what training runs.
        """
        # A variant written before transcoders takes (x, coefficients): the target is passed only when there is one.
        with weights_once(self.sae):  # a reparametrised SAE (decoder_rescale.py) computes its weights once a step
            out = (self._training_loss(batch, coefficients) if target is None
                   else self._training_loss(batch, coefficients, target))
        loss = sum(out.terms.values())
        if self.defers_checks(batch):
            self.watch.record(out.terms, step)
            if with_l0:  # a logging step: the reads a GPU step defers
                self.read_watch()
                self.sae.refresh_dead_bound()
        elif not torch.isfinite(loss):
            bad = [name for name, term in out.terms.items() if not torch.isfinite(term)]
            raise FloatingPointError(f"non-finite loss at step {step}: term(s) {', '.join(bad)}")
        with torch.no_grad():
            fired, n_tokens = out.fired(), out.n_tokens
            active = out.active_count() if with_l0 or self.target_l0 is not None else None
            if distributed:  # every rank keeps the same statistics: those of the global batch
                fired = fired.to(torch.int32)
                torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
                if active is not None:
                    active = active.to(torch.int64)
                    torch.distributed.all_reduce(active)
                n_tokens *= torch.distributed.get_world_size()
            self.sae.record_fired(fired.bool(), n_tokens)
            if active is not None:
                out.extras["l0"] = active.float() / n_tokens  # logged as train/l0
            if self.l0_controller is not None:
                self.l0_controller.update(out.extras["l0"], step)
                if with_l0:
                    out.extras |= self.l0_controller.logs(step)
        return loss, out

    def defers_checks(self, batch: Tensor) -> bool:
        """Whether this step's finite check is deferred to the next logging step (off the CPU, by default)."""
        return self.deferred_checks if self.deferred_checks is not None else batch.device.type != "cpu"

    def read_watch(self) -> None:
        """Report the non-finite steps recorded since the last read. Their updates were skipped on the device
        (SAEModule passes the flag to fused Adam), so under nan_policy=skip they count as skipped batches;
        under stop, FloatingPointError names the first bad step and the terms, as the immediate check does."""
        report = self.watch.read()
        if report is None:
            return
        if self.nan_policy == "stop":
            raise FloatingPointError(report.message())
        log.warning("%s: %d batch(es) skipped (nan_policy=skip)", report.message(), report.steps)
        self.skipped_batches.add_(report.steps)

    def step_metrics(self, batch: Tensor, loss: Tensor, out: TrainStep, coefficients: dict[str, float], lr: float
                     ) -> dict[str, Any]:
        """What a logging step sends to the loggers: loss, loss terms, coefficients, extras, L0, FVU, dead."""
        logs: dict[str, Any] = {"loss": loss.detach()}
        logs |= {f"loss/{name}": term.detach() for name, term in out.terms.items()}
        logs |= {f"coef/{name}": value for name, value in coefficients.items()}
        logs |= {f"train/{name}": value.detach() for name, value in out.extras.items()}
        if "rec" in out.terms:  # FVU of this batch (a transcoder's: of its target), about its own mean
            variance = (batch - batch.mean(0)).pow(2).sum(-1).mean()
            logs["train/fvu"] = out.terms["rec"].detach() / variance
        logs["lr"] = lr
        logs["train/dead_fraction"] = self.sae.dead_mask(self.dead_window_tokens).float().mean()
        if (rate := self.tokens_per_s()) is not None:
            logs["tok/s"] = rate
        return logs

    def record_batch(self, n_tokens: int) -> None:
        self._step_times.append((time.perf_counter(), n_tokens))

    def tokens_per_s(self) -> float | None:
        """Tokens/s over the last 20 steps, data generation included (what the run actually achieves)."""
        if len(self._step_times) < 2:
            return None
        (t0, _), (t1, _) = self._step_times[0], self._step_times[-1]
        return sum(n for _, n in list(self._step_times)[1:]) / max(t1 - t0, 1e-9)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Send scalars to this member's loggers only (a group's jobs each have their own run)."""
        if not self.loggers:
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, Tensor))}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=step)

    def param_group(self) -> dict[str, Any]:
        """This member's Adam parameter group: its parameters, learning rate and betas."""
        cfg = self.optim_cfg
        betas = tuple(cfg["betas"]) if cfg.get("betas") is not None else self.sae.recipe_adam_betas
        return {"params": list(self.sae.parameters()), "lr": float(cfg["lr"]), "betas": betas,
                "fused": bool(cfg["fused"])}

    def lr_lambda(self, step: int) -> float:
        cfg = self.optim_cfg
        warmup = cfg.get("lr_warmup_steps")
        warmup = self.sae.recipe_lr_warmup_steps if warmup is None else int(warmup)
        return lr_factor(step, self.max_steps, warmup, str(cfg["lr_warmup"]),
                         float(cfg["lr_decay_fraction"]))

    def non_finite_weights(self) -> list[str]:
        return [name for name, value in self.state_dict().items()
                if value.is_floating_point() and not torch.isfinite(value).all()]
