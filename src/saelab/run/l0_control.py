"""`sae.target_l0`'s controller: it adapts the sparsity coefficient during training until the batch L0 is the
target, so a sweep compares variants at equal sparsity instead of at equal coefficients.

The coefficient is lambda_t = lambda_0 g_t with a gain g_t set by proportional-integral control of log g:

    I_{t+1} = I_t + k_i e_t,        log g_t = I_{t+1} + k_p e_t

- Target schedule. T_t eases (a half cosine in log L0) from the first controlled batch's L0 -- the dense start,
  where ~half the latents fire -- down to the target over `ramp_fraction` of the steps, then stays there.
  Chasing a target ~100x below the current L0 at once winds the integral up: lambda keeps rising while the
  encoder lags, L0 then falls through the target, and on real activations that is hard to undo (a Gated SAE's
  closed gates get no gradient to reopen). Along the ramp L0 meets its target from above.
- The ramp is an upper envelope, so the error is e_t = log(L0_t / T_t) above it, log(L0_t / target) below the
  target, and 0 in between (L0 falling faster than the ramp on its own is no reason to lower lambda); clipped to
  [-1, 1].
- A strong proportional term: when L0 drifts below the target, lambda drops at once instead of at the
  integral's pace, before more gates close. Measured on MiniLM (Gated, frozen decoder, 300 steps): k_p 0.5-1
  ended 15% below the target at 24, k_p 3 within 5%.
- A fast integral (k_i 0.1): late in a run L0 drifts at a fixed lambda as the dictionary learns, and an
  integral lags a drift by drift / k_i. Measured (MiniLM, target 24): k_i 0.03 ended JumpReLU (eps 1e-4) 11% and
  the sigmoid-gated SAE 15-25% below the target, k_i 0.1 within 1-2% of it for both.
- Anti-windup: the integral is clamped to the gain's bounds, so it never winds up past them. Holding it through
  the learning rate's final decay, or freezing the coefficient there, changed nothing measurable, so control
  simply goes on.
- Conditional integration (`hold_horizon`, off by default): the integral is held while L0 already heads for the
  target fast enough to reach it within hold_horizon x max_steps steps (its per-step slope from an EMA of
  log L0). A JumpReLU threshold moves at most ~lr per step under Adam whatever lambda is, so past some lambda
  more of it buys no speed: the integral only winds up (at eps 1e-4 to the gain's bound, 10^4) and L0 then
  falls through the target while lambda takes the rest of the run to unwind. Measured (MiniLM, JumpReLU,
  target 8, 500 steps, 3 seeds): without the hold eps 1e-4 ends at 6.45-7.12, with 0.1 at 6.47-7.10, with 0.2
  at 8.00-8.14 (eps 1e-3: 8.17-8.23). Off by default: a Gated SAE's L0 keeps drifting down after its fast fall,
  and with the hold (0.2, 300 steps) 11 of its 29 reachable MiniLM runs ended more than 5% above the target.
- A signed gain (`signed`; null, the default, = on where the variant takes it: JumpReLU's L0 penalty):
  g_t = sinh(u_t + asinh 1) of the log-gain u_t instead of exp(u_t) -- 1 at u = 0, ~exp(u) above, through 0 to
  negative below. A coefficient >= 0 can only push JumpReLU's thresholds up, and past the ramp its
  L0 keeps falling as the encoder grows more selective: on the 8k SynthSAEBench world (free decoder at init 0.1)
  L0 fell from the target 25 to 13 with the coefficient at its floor and the thresholds flat. A negative L0
  coefficient rewards firing, and its straight-through gradient pulls the thresholds down at the pace the
  positive one pushes them up: the same run then ends at 25.7 (docs/results/jumprelu_default_search.md). Only a
  penalty that counts active latents takes it (SAE.signed_sparsity_coefficient); a negative L1 is unbounded.

Everything stays on the device: one small in-place update per step, no host read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError, check_bool, check_positive
from saelab.sections import read_section

GAIN_BOUNDS = (1e-4, 1e4)  # the gain's range: far beyond what any run needs, so hitting it means no L0 can be reached


@dataclass(frozen=True)
class L0ControlConfig:
    ramp_fraction: float = 0.4  # the target falls from the first L0 to sae.target_l0 over this fraction of the steps
    proportional: float = 3.0  # k_p: log-gain per unit of log error, at once
    integral: float = 0.1  # k_i: log-gain per unit of log error, accumulated every step
    hold_horizon: float = 0.0  # hold the integral while L0 heads for the target within this fraction of the steps
    signed: bool | None = None  # the gain may turn negative (module docstring); None: where the variant takes it

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> L0ControlConfig:
        return read_section("l0_control", cls, section)

    def validate(self) -> None:
        if not 0 <= self.ramp_fraction < 1:
            raise ConfigError("l0_control.ramp_fraction", self.ramp_fraction, "a fraction in [0, 1)")
        check_positive("l0_control.proportional", self.proportional, allow_zero=True)
        check_positive("l0_control.integral", self.integral)
        check_positive("l0_control.hold_horizon", self.hold_horizon, allow_zero=True)
        if self.signed is not None:
            check_bool("l0_control.signed", self.signed)


class L0Controller(nn.Module):
    """The gain g_t on the sparsity coefficient (module docstring). Its state is in buffers, so a checkpoint
    resumes the same trajectory."""

    def __init__(self, target: float, cfg: L0ControlConfig, start_step: int, max_steps: int):
        """`start_step`: the first step controlled (after the coefficient's warm-up)."""
        super().__init__()
        self.target, self.cfg, self.start_step = float(target), cfg, int(start_step)
        self.ramp_steps = int(cfg.ramp_fraction * max_steps)
        self.hold_steps = cfg.hold_horizon * max_steps
        self.register_buffer("gain", torch.ones((), dtype=torch.float64))
        self.register_buffer("accumulated", torch.zeros((), dtype=torch.float64))  # I_t
        self.register_buffer("start_l0", torch.zeros((), dtype=torch.float64))  # 0: not yet seen
        self.register_buffer("error", torch.zeros((), dtype=torch.float64))  # e_t, for the logs
        self.register_buffer("log_l0", torch.zeros((), dtype=torch.float64))  # EMA of log L0 (hold only)
        self.register_buffer("slope", torch.zeros((), dtype=torch.float64))  # EMA of its change per step

    def target_at(self, step: int) -> Tensor:
        """T_t: from the first controlled L0 (at least the target) down to the target over the ramp, along a half
        cosine in log L0 (steep in the middle, flat at both ends)."""
        remaining = 1.0 - (step - self.start_step) / self.ramp_steps if self.ramp_steps > 0 else 0.0
        if remaining <= 0:
            return torch.full_like(self.start_l0, self.target)
        remaining = min(remaining, 1.0)
        remaining = 0.5 * (1 - math.cos(math.pi * remaining))
        start = self.start_l0.clamp(min=self.target)
        return self.target * (start / self.target) ** remaining

    @torch.no_grad()
    def update(self, l0: Tensor, step: int) -> None:
        """One control step from this batch's L0 (a device scalar)."""
        if step < self.start_step:
            return
        l0 = l0.double().clamp(min=1e-2 * self.target)
        first = self.start_l0 == 0  # the first controlled step
        self.start_l0.copy_(torch.where(first, l0, self.start_l0))
        # The ramp is an upper envelope: above it, lambda rises; between it and the target, nothing pushes
        # (L0 falling faster than the ramp on its own is no reason to lower lambda); below the target, it falls.
        above = torch.log(l0 / self.target_at(step)).clamp(min=0.0)
        below = torch.log(l0 / self.target).clamp(max=0.0)
        error = (above + below).clamp(-1.0, 1.0)
        integrate = self.cfg.integral * error
        if self.hold_steps > 0:  # heading for the target fast enough already: more lambda would only wind up
            previous = torch.where(first, torch.log(l0), self.log_l0)
            self.log_l0.copy_(0.9 * previous + 0.1 * torch.log(l0))
            self.slope.mul_(0.9).add_(0.1 * (self.log_l0 - previous))
            heading = (error * self.slope < 0) & (self.slope.abs() * self.hold_steps > error.abs())
            integrate = integrate.masked_fill(heading, 0.0)
        self.accumulated.add_(integrate).clamp_(*(math.log(b) for b in GAIN_BOUNDS))
        log_gain = self.accumulated + self.cfg.proportional * error
        if self.cfg.signed:  # sinh(u + asinh 1): 1 at u = 0, ~exp(u) above, through 0 to ~-exp(-u) below
            low, high = (math.log(b) for b in GAIN_BOUNDS)
            self.gain.copy_(torch.sinh(log_gain.clamp(low, high) + math.asinh(1.0)))
        else:
            self.gain.copy_(torch.exp(log_gain).clamp(*GAIN_BOUNDS))
        self.error.copy_(error)

    def logs(self, step: int) -> dict[str, Tensor]:
        """What a logging step records: the schedule's target now and the last log error."""
        return {"l0_target": self.target_at(step).float(), "l0_error": self.error.float()}
