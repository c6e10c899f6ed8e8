"""JumpReLU SAE (SPEC section 3): f_i = pi_i H(pi_i - theta_i), trained through straight-through estimators.

The threshold theta is a float32 parameter whatever the compute precision: Adam moves it at the scale of the
bandwidth (the papers' 1e-3, the recipe's 1e-2), where bf16's 8-bit mantissa could not. With
sae.threshold_units=encoder_gain (the recipe) it is stored as theta_i = t_i g_i, g_i = w_i . d_i / ||d_i|| not
trained, so the thresholds follow the encoder's growth; the straight-through gradients reach t_i as g_i dL/dtheta_i.

Exported, it is SAELens's "jumprelu" layout (and "jumprelu_transcoder", "jumprelu_skip_transcoder"), declared
here; BatchTopK and Matryoshka BatchTopK export into it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError, check_bool, check_choice, check_positive
from saelab.kernels.fused_relu import JumpReLUL0Function
from saelab.saes.base import SAE, SAEConfig, TrainStep, squared_error
from saelab.saes.saelens_layout import SAELensLayout, register_layout
from saelab.saes.ste import KERNELS, jumprelu, step


@dataclass
class JumpReLUConfig(SAEConfig):
    sparsity: str = "l0"  # l0: lambda sum_i H(pi_i - theta_i) | tanh: lambda sum_i tanh(c f_i ||d_i||)
    bandwidth: float = 0.001  # epsilon, the STE kernel width (in normalised-activation units)
    kernel: str = "rectangle"  # rectangle: 1[|u| < 1/2] | triangle: max(0, 1 - |u|)
    threshold_init: float = 0.05  # theta at init (papers: 0.001, which Adam needs many steps to leave)
    threshold_init_density: float | None = None  # set theta at the first batch: each latent fires on this fraction
    threshold_param: str = "raw"  # raw: theta stored directly, floored above 0 | log: theta = exp(t)
    threshold_pace: float = 1.0  # theta's stored parameter is scaled by this: Adam moves theta ~pace x lr a step
    threshold_units: str = "absolute"  # absolute | encoder_gain: theta_i = t_i w_i.d_i/||d_i|| (gain not trained)
    ste_to_preacts: bool = False  # pi also gets minus theta's STE pseudo-gradient (Anthropic 2025)
    pre_act_loss_coefficient: float = 0.0  # lambda_p sum_i ReLU(theta_i - pi_i) ||d_i|| (0 = off)
    tanh_scale: float = 4.0  # c in the tanh penalty

    def validate(self) -> None:
        super().validate()
        check_choice("sae.sparsity", self.sparsity, ("l0", "tanh"))
        if self.sparsity == "tanh":
            self.require_free_decoder_norms(self.sparsity)
        check_positive("sae.bandwidth", self.bandwidth)
        check_choice("sae.kernel", self.kernel, tuple(KERNELS))
        check_positive("sae.threshold_init", self.threshold_init)
        if self.threshold_init_density is not None and not 0 < self.threshold_init_density < 1:
            raise ConfigError("sae.threshold_init_density", self.threshold_init_density, "null or a fraction in (0, 1)")
        check_choice("sae.threshold_param", self.threshold_param, ("raw", "log"))
        check_positive("sae.threshold_pace", self.threshold_pace)
        check_choice("sae.threshold_units", self.threshold_units, ("absolute", "encoder_gain"))
        check_bool("sae.ste_to_preacts", self.ste_to_preacts)
        check_positive("sae.pre_act_loss_coefficient", self.pre_act_loss_coefficient, allow_zero=True)
        check_positive("sae.tanh_scale", self.tanh_scale)

    def scale_dependent(self) -> dict[str, int]:
        # Both penalties count (L0; tanh saturates at 1 per latent), so lambda follows the MSE's s^2; tanh's c
        # multiplies a latent value, the pre-activation loss sums (theta - pi) values.
        return {"sparsity_coefficient": 2, "bandwidth": 1, "threshold_init": 1, "tanh_scale": -1,
                "pre_act_loss_coefficient": 1}


def jumprelu_encoder(tensors: Mapping[str, Tensor], cfg: Mapping[str, Any], x: Tensor) -> Tensor:
    """SAELens "jumprelu": ReLU(pre) where pre = x W_enc + b_enc exceeds the latent's threshold (x centred as cfg
    says)."""
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    return torch.relu(pre) * (pre > tensors["threshold"]).to(x.dtype)


JUMPRELU_LAYOUT = register_layout(SAELensLayout("jumprelu", jumprelu_encoder, transcoder="jumprelu_transcoder",
                                                skip_transcoder="jumprelu_skip_transcoder"))


class JumpReLUSAE(SAE):
    Config = JumpReLUConfig
    saelens_architecture = "jumprelu"
    recipe_adam_betas = (0.0, 0.999)

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.cfg: JumpReLUConfig = cfg
        self.W_enc = nn.Parameter(self.init_decoder_and_tied_encoder())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        init = torch.full((self.d_sae,), float(cfg.threshold_init), dtype=torch.float32)
        if cfg.threshold_param == "raw":
            self.raw_threshold = nn.Parameter(torch.empty_like(init))
        else:
            self.log_threshold = nn.Parameter(torch.empty_like(init))
        with torch.no_grad():
            self._store_threshold(init)
        # sae.threshold_init_density: thresholds set from the first training batch's pre-activations. The buffer
        # says it is done (saved in checkpoints); the host flag mirrors it so a step never reads the device.
        self._calibration_pending = cfg.threshold_init_density is not None
        if self._calibration_pending:
            self.register_buffer("threshold_calibrated", torch.zeros((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        done = state_dict.get(prefix + "threshold_calibrated")
        if done is not None:
            self._calibration_pending = not bool(done)

    @torch.no_grad()
    def calibrate_thresholds(self, x: Tensor) -> None:
        """theta_i = the (1 - density) quantile of latent i's pre-activations over the batch x (floored above 0),
        so every latent starts firing on that fraction of tokens whatever the encoder's initial scale."""
        pre = self.preacts(x).float()
        batch = pre.shape[0]
        k = min(batch, max(1, round((1.0 - float(self.cfg.threshold_init_density)) * batch)))
        theta = pre.kthvalue(k, dim=0).values.clamp_min(self.threshold_floor)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(theta, op=torch.distributed.ReduceOp.AVG)
        self._store_threshold(theta)
        self.threshold_calibrated.fill_(True)
        self._calibration_pending = False

    @torch.no_grad()
    def reinitialise_scaled(self) -> None:
        self._store_threshold(torch.full_like(self.threshold, float(self.cfg.threshold_init)))

    def _threshold_unit(self) -> Tensor | None:
        """sae.threshold_units=encoder_gain: g_i = w_i . d_i / ||d_i||, the gain of latent i's pre-activation
        along its own decoder direction (not differentiated; floored above 0). theta_i = t_i g_i is then a
        threshold on the feature's coefficient itself: it follows the encoder's growth (on MiniLM pre-activations
        grow ~10x in the first 100 steps from decoder_init_norm 0.1) without Adam having to move it there at ~lr
        a step, and what Adam's noise adds to w_i off the latent's direction leaves it alone. A transcoder's
        decoder writes another space, so there the unit is ||w_i||."""
        if self.cfg.threshold_units == "absolute":
            return None
        W, D = self.W_enc.detach().float(), self.W_dec.detach().float()
        if self.transcoder:
            return W.norm(dim=0).clamp_min(1e-12)
        return ((W.t() * D).sum(1) / D.norm(dim=1).clamp_min(1e-12)).clamp_min(1e-6)

    def _store_threshold(self, theta: Tensor) -> None:
        """Write theta into its parameter: theta = pace x raw, or exp(pace x t) (sae.threshold_pace), times the
        unit of sae.threshold_units."""
        pace = float(self.cfg.threshold_pace)
        unit = self._threshold_unit()
        if unit is not None:
            theta = theta.float() / unit
        if self.cfg.threshold_param == "raw":
            self.raw_threshold.copy_(theta.clamp_min(self.threshold_floor) / pace)
        else:
            self.log_threshold.copy_(theta.log() / pace)

    @property
    def signed_sparsity_coefficient(self) -> bool:
        """The L0 count takes a negative coefficient: its straight-through gradient then lowers the thresholds."""
        return self.cfg.sparsity == "l0"

    @property
    def threshold(self) -> Tensor:
        """theta in float32 (> 0 under both parameterisations)."""
        pace = float(self.cfg.threshold_pace)
        if self.cfg.threshold_param == "raw":
            theta = self.raw_threshold.float() * pace
        else:
            theta = (self.log_threshold.float() * pace).exp()
        unit = self._threshold_unit()
        return theta if unit is None else theta * unit

    @property
    def threshold_floor(self) -> float:
        """Where `raw` thresholds are clamped: far below the bandwidth, yet positive (f > 0 when active)."""
        return min(self.cfg.bandwidth, self.cfg.threshold_init) * 1e-3

    def preacts(self, x: Tensor) -> Tensor:
        return self.encoder_preacts(x, self.W_enc, self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        pre = self.preacts(x)
        return torch.where(pre.float() > self.threshold, pre, 0.0)

    def training_loss(self, x: Tensor, coefficients: Mapping[str, float], target: Tensor | None = None
                      ) -> TrainStep:
        if self._calibration_pending:
            self.calibrate_thresholds(x)
        t = self.reconstruction_target(x, target)
        cfg = self.cfg
        if (cfg.sparsity == "l0" and not cfg.ste_to_preacts and cfg.pre_act_loss_coefficient == 0
                and self.fused_ok(x)):
            theta = self.threshold
            x_hat, f, l0, fired = JumpReLUL0Function.apply(
                x, self.W_enc, self.folded_bias(self.W_enc, self.b_enc), theta, self.W_dec, self.b_dec,
                cfg.bandwidth, cfg.kernel, (self.workspace("f", x), self.workspace("grad_f", x)), self.products)
            terms = {"rec": squared_error(t, x_hat), "sparsity": coefficients["sparsity"] * l0}
            return TrainStep(terms, f, extras={"threshold_mean": theta.detach().mean()}, fired_mask=fired)
        pre, theta = self.preacts(x), self.threshold
        f = jumprelu(pre, theta, cfg.bandwidth, cfg.kernel, cfg.ste_to_preacts)
        terms = {"rec": squared_error(t, self.decode(f))}
        if cfg.sparsity == "l0":
            penalty = step(pre, theta, cfg.bandwidth, cfg.kernel, cfg.ste_to_preacts).sum(-1).mean()
        else:
            penalty = torch.tanh(cfg.tanh_scale * f * self.decoder_norms()).sum(-1).mean()
        terms["sparsity"] = coefficients["sparsity"] * penalty
        if cfg.pre_act_loss_coefficient > 0:
            below = torch.relu(theta - pre.float()) @ self.decoder_norms().float()
            terms["pre_act"] = cfg.pre_act_loss_coefficient * below.mean()
        return TrainStep(terms, f, extras={"threshold_mean": theta.detach().mean()})

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise the decoder (base), then keep raw thresholds positive."""
        super().after_optimizer_step()
        if self.cfg.threshold_param == "raw":
            self.raw_threshold.clamp_(min=self.threshold_floor / float(self.cfg.threshold_pace))

    @torch.no_grad()
    def import_threshold(self, threshold: Tensor) -> None:
        if self._calibration_pending:  # fine-tuning keeps the imported thresholds
            self.threshold_calibrated.fill_(True)
            self._calibration_pending = False
        if self.cfg.threshold_param == "log" and not (threshold > 0).all():
            raise ConfigError("init_from", "threshold", "positive thresholds for sae.threshold_param=log "
                              "(sae.threshold_param=raw takes any)")
        self._store_threshold(threshold)

    def export_tensors(self, scale: float) -> dict[str, Tensor]:
        return self.standard_tensors(scale) | {"threshold": self.threshold.detach() * scale}
