"""Plain hand-written training steps, one per SAE variant, for benchmarks/train_step.py's same-run reference.

Each is what someone would write from the maths with torch operators and autograd, nothing fused: the loss,
backward, torch.optim.Adam(fused=True), and the unit-norm decoder constraint (the gradient's component along
each decoder row removed before the step, the rows renormalised after it). saelab's step on the same variant,
shapes, dtype and autocast divided by this one is the speed-up its kernels buy over the obvious implementation.

  relu       f = ReLU((x - b_dec) W_enc + b_enc);  L = ||x - x_hat||^2 + lambda ||f||_1
  gated      z = (x - b_dec) W_enc, pi_gate = z + b_gate, pi_mag = exp(r_mag) z + b_mag, f = H(pi_gate) ReLU(pi_mag);
             L = ||x - x_hat||^2 + lambda ||ReLU(pi_gate)||_1 + ||x - (ReLU(pi_gate) sg(W_dec) + sg(b_dec))||^2
             (b_dec still gets the gate terms' gradient through the centring; saelab stops it there too, which
             changes no loss value and no matmul)
  jumprelu   f = pi H(pi - theta), pi = (x - b_dec) W_enc + b_enc; L = ||x - x_hat||^2 + lambda sum_i H(pi_i - theta_i);
             theta learns through the rectangle-kernel straight-through estimator (bandwidth eps), and is
             clamped above 0 after each step. With sae.threshold_units=encoder_gain (the default) theta_i =
             t_i sg(w_i . d_i / ||d_i||) and t is the trained tensor (the first batch's calibration of the
             thresholds, threshold_init_density, is a one-off set-up, not copied)
  topk       f = scatter(torch.topk(pi, k)) after a ReLU, decoded densely; L = ||x - x_hat||^2 (AuxK left out: it
             is zero until a latent has been silent for dead_window_tokens). With sae.decoder_constraint=rescale
             (TopK's default) pi is times the decoder rows' norms and x_hat decodes with the unit rows
  batchtopk  the same with one topk of B k entries over the flattened batch

The losses use the SAE's own weights, coefficients and hyperparameters, so at step 0 they equal saelab's
(tests/test_benchmarks.py checks it). Only these default configurations are written here: `unsupported`
names the setting for which the reference would compute something else.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.cuda_timing import Clock, count_host_syncs
from saelab.saes.decoder_rescale import raw_parameter

VARIANTS = ("relu", "gated", "jumprelu", "topk", "batchtopk")


class RectangleJumpReLU(torch.autograd.Function):
    """f = pi H(pi - theta); df/dpi = H, df/dtheta = -(theta / eps) 1[|pi - theta| < eps / 2]."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.eps / 2) / ctx.eps
        return grad * (pre > theta), -(theta * window * grad).sum(0), None


class RectangleStep(torch.autograd.Function):
    """H(pi - theta) as a float count; no gradient to pi, dH/dtheta = -(1 / eps) 1[|pi - theta| < eps / 2]."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.eps / 2) / ctx.eps
        return None, -(window * grad).sum(0), None


def unsupported(variant: str, cfg: Any) -> str | None:
    """Why the reference cannot stand in for this SAE configuration (None: it computes the same loss)."""
    if variant not in VARIANTS:
        return f"no reference for {variant}"
    if getattr(cfg, "d_out", None) is not None:
        return "transcoders have no reference"
    rules = {
        "relu": {"sparsity": "l1"},
        "gated": {"sparsity": "l1", "gate": "heaviside", "tie_encoder": True, "r_mag": True,
                  "aux_loss": "frozen_decoder"},
        "jumprelu": {"sparsity": "l0", "kernel": "rectangle", "ste_to_preacts": False,
                     "pre_act_loss_coefficient": 0.0, "threshold_param": "raw", "threshold_pace": 1.0},
    }.get(variant, {})
    for field, value in rules.items():
        if getattr(cfg, field) != value:
            return f"the reference implements {field}={value}, not {getattr(cfg, field)}"
    return None


class ReferenceSAE(nn.Module):
    """A copy of an SAE's weights and the plain training step of its variant (see the module docstring)."""

    def __init__(self, variant: str, sae: nn.Module, lr: float, betas: tuple[float, float],
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        reason = unsupported(variant, sae.cfg)
        if reason is not None:
            raise ValueError(reason)
        self.variant, self.autocast_dtype = variant, autocast_dtype
        cfg = sae.cfg
        self.coefficient = float(cfg.sparsity_coefficient)
        self.k = int(getattr(sae, "k", 0))
        self.unit_norm = cfg.decoder_constraint == "unit_norm"
        self.rescale = cfg.decoder_constraint == "rescale"  # SAELens's TopK parametrisation (decoder_rescale.py)
        self.centre = bool(cfg.apply_b_dec_to_input)
        names = {"relu": ["b_enc"], "topk": ["b_enc"], "batchtopk": ["b_enc"], "jumprelu": ["b_enc"],
                 "gated": ["b_gate", "b_mag", "r_mag"]}[variant]
        for name in ["W_enc", "W_dec", "b_dec", *names]:
            setattr(self, name, nn.Parameter(raw_parameter(sae, name).detach().clone()))
        if variant == "jumprelu":
            self.encoder_gain = cfg.threshold_units == "encoder_gain"
            self.theta = nn.Parameter(sae.raw_threshold.detach().clone())  # t under encoder_gain
            self.bandwidth = float(cfg.bandwidth)
            self.theta_floor = min(float(cfg.bandwidth), float(cfg.threshold_init)) * 1e-3
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=betas, fused=True)

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        """The named loss terms of the variant on batch x (inside the caller's autocast, if any)."""
        xc = x - self.b_dec if self.centre else x
        if self.variant == "gated":
            z = xc @ self.W_enc
            pi_gate, pi_mag = z + self.b_gate, self.r_mag.exp() * z + self.b_mag
            f = (pi_gate > 0) * torch.relu(pi_mag)
            gate = torch.relu(pi_gate)
            aux_hat = gate @ self.W_dec.detach() + self.b_dec.detach()
            return {"rec": self.squared_error(x, f @ self.W_dec + self.b_dec),
                    "sparsity": self.coefficient * gate.sum(-1).mean(),
                    "aux": self.squared_error(x, aux_hat)}
        pre = xc @ self.W_enc + self.b_enc
        if self.variant == "relu":
            f = torch.relu(pre)
            return {"rec": self.squared_error(x, f @ self.W_dec + self.b_dec),
                    "sparsity": self.coefficient * f.sum(-1).mean()}
        if self.variant == "jumprelu":
            theta = self.theta
            if self.encoder_gain:  # theta_i = t_i w_i . d_i / ||d_i||, the gain not trained
                W_enc, W_dec = self.W_enc.detach(), self.W_dec.detach()
                theta = theta * ((W_enc.t() * W_dec).sum(1) / W_dec.norm(dim=1)).clamp_min(1e-6)
            f = RectangleJumpReLU.apply(pre, theta, self.bandwidth)
            l0 = RectangleStep.apply(pre, theta, self.bandwidth).sum(-1).mean()
            return {"rec": self.squared_error(x, f @ self.W_dec + self.b_dec), "sparsity": self.coefficient * l0}
        decoder = self.W_dec
        if self.rescale:  # latents times ||d_i||, decoded by the unit rows d_i / ||d_i||
            norms = self.W_dec.norm(dim=1)
            pre, decoder = pre * norms, self.W_dec / norms.unsqueeze(1)
        if self.variant == "topk":
            values, ids = pre.topk(self.k, dim=-1, sorted=False)
            f = torch.zeros_like(pre).scatter(-1, ids, torch.relu(values))
        else:  # batchtopk: the B k largest entries of the whole batch
            values, ids = pre.flatten().topk(pre.shape[0] * self.k, sorted=False)
            f = torch.zeros_like(pre).flatten().scatter(0, ids, torch.relu(values)).view_as(pre)
        return {"rec": self.squared_error(x, f @ decoder + self.b_dec)}

    @staticmethod
    def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
        """E_b ||x - x_hat||^2, summed over dimensions (saelab's L_rec)."""
        return (x_hat - x).pow(2).sum(-1).mean()

    def step(self, x: Tensor) -> Tensor:
        """One training step on x; returns the loss (not synchronised: a device tensor)."""
        with self.autocast(x.device.type):
            loss = sum(self.terms(x).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            if self.unit_norm:  # keep each row's norm: drop the gradient's component along the row
                grad, rows = self.W_dec.grad, self.W_dec
                grad -= (grad * rows).sum(1, keepdim=True) * rows
            self.optimizer.step()
            if self.unit_norm:
                self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            if self.variant == "jumprelu":
                self.theta.clamp_(min=self.theta_floor)
        return loss.detach()


def time_reference(reference: ReferenceSAE | None, note: str | None, batch: Callable[[int], Tensor], warmup: int,
                   steps: int, sync_steps: int, clock: Clock) -> dict[str, Any]:
    """The reference step's tokens/s on the batches saelab's step saw (same warm-up and step count) and its host
    syncs; `note` says why there is no reference (an SAE configuration it does not implement)."""
    if reference is None:
        return {"reference_tokens_per_s": None, "reference_ratio": None, "reference_note": note}
    marks = []
    for step in range(warmup + steps):
        x = batch(step)
        start = clock.mark()
        reference.step(x)
        if step >= warmup:
            marks.append((start, clock.mark()))
    clock.sync()
    step_s = statistics.median(clock.seconds(*m) for m in marks)
    syncs = count_host_syncs(lambda: reference.step(batch(0)), sync_steps, clock.device)
    return {"reference_ms_per_step": 1e3 * step_s, "reference_tokens_per_s": len(batch(0)) / step_s,
            "reference_ratio": None, "reference_note": note, "reference_syncs_per_step": syncs["syncs_per_step"]}
