"""Gated SAE (SPEC section 2): a gate decides which latents fire, a magnitude path decides how much.

    pi_gate = W_gate (x - b_dec) + b_gate      pi_mag = exp(r_mag) * W_gate (x - b_dec) + b_mag
    f = H(pi_gate) * ReLU(pi_mag)              L = ||x - x_hat||^2 + lambda ||ReLU(pi_gate)||_1 + L_aux

The Heaviside gate passes no gradient, so the gate learns only from the sparsity term and from
L_aux = ||x - (sg(W_dec) ReLU(pi_gate) + sg(b_dec))||^2, which reconstructs through a frozen copy of the
decoder. "Frozen" here covers b_dec everywhere in the gate's terms, including the pre-encoder centring
x - b_dec: the decoder (W_dec, b_dec) then learns only from L_rec, as SPEC section 2 requires. With tied
weights the SAE is exactly a JumpReLU with theta_i = max(0, b_mag_i - exp(r_mag_i) b_gate_i).

Under `sparsity: ri_l1` (lambda sum_i ReLU(pi_gate_i) ||d_i||) the penalty detaches ||d_i|| whenever the
decoder is frozen (`aux_loss` frozen_decoder, and none so that ablation only drops L_aux): the authors' rule
is to freeze the decoder in both places or in neither.

Exported, it is SAELens's "gated" layout, or saelab's untied one (UNTIED_ARCHITECTURE), both declared here with
their encoders; export_as_jumprelu_tensors gives the tied SAE's JumpReLU equivalent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import check_bool, check_choice, check_positive
from saelab.kernels.fused_gated import GatedFunction
from saelab.saes.base import SAE, SAEConfig, TrainStep, squared_error
from saelab.saes.saelens_layout import SAELensLayout, register_layout

# The gate's own starting lambda where sae.sparsity_coefficient is null: the Heaviside gate's penalty is an L1 of
# ReLU(pi_gate), the sigmoid gate's a soft count of open gates, ~30x larger per latent. Measured on MiniLM (300
# steps, target L0 8 / 24, 3 seeds): the sigmoid gate started at 0.15 collapsed to L0 ~0.1 within 20 steps and
# ended 5-7% off its targets without L_aux; started at 0.005 every run landed within 3%, FVU 0.70 -> 0.37 at L0 8.
GATE_COEFFICIENT = {"heaviside": 0.15, "sigmoid": 0.005}


@dataclass
class GatedConfig(SAEConfig):
    sparsity_coefficient: float | None = 0.0  # lambda; None = GATE_COEFFICIENT[gate] (the YAML's default)
    aux_loss: str = "frozen_decoder"  # frozen_decoder (paper) | unfrozen_decoder | none
    gate: str = "heaviside"  # heaviside: H(pi_gate) | sigmoid: sigmoid(pi_gate / gate_temperature)
    gate_temperature: float = 0.01  # sigmoid gate's temperature (in normalised pre-activation units)
    r_mag: bool = True  # W_mag = exp(r_mag) W_gate with trainable r_mag; false fixes r_mag = 0
    tie_encoder: bool = True  # false: an independent W_mag (ablation; r_mag is then unused)
    sparsity: str = "l1"  # l1: lambda ||gate||_1 | ri_l1: lambda sum_i gate_i ||d_i||

    def validate(self) -> None:
        check_choice("sae.gate", self.gate, ("heaviside", "sigmoid"))
        if self.sparsity_coefficient is None:
            self.sparsity_coefficient = GATE_COEFFICIENT[self.gate]
        super().validate()
        check_choice("sae.aux_loss", self.aux_loss, ("frozen_decoder", "unfrozen_decoder", "none"))
        check_positive("sae.gate_temperature", self.gate_temperature)
        check_bool("sae.r_mag", self.r_mag)
        check_bool("sae.tie_encoder", self.tie_encoder)
        check_choice("sae.sparsity", self.sparsity, ("l1", "ri_l1"))
        if self.sparsity == "ri_l1":
            self.require_free_decoder_norms(self.sparsity)

    def scale_dependent(self) -> dict[str, int]:
        # L1 of ReLU(pi_gate) scales by s; the sigmoid gate's penalty counts (scale-free), like an L0.
        return {"sparsity_coefficient": 1 if self.gate == "heaviside" else 2, "gate_temperature": 1}


def gated_latents(x: Tensor, W_gate: Tensor, b_gate: Tensor, W_mag: Tensor, b_mag: Tensor) -> Tensor:
    """f = H(x W_gate + b_gate) * ReLU(x W_mag + b_mag), on x centred as the export's cfg.json says."""
    pi_gate = x @ W_gate + b_gate
    pi_mag = x @ W_mag + b_mag
    return (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)


def gated_encoder(tensors: Mapping[str, Tensor], cfg: Mapping[str, Any], x: Tensor) -> Tensor:
    """SAELens "gated": the magnitude path reads the gate's directions, W_mag = exp(r_mag) W_enc."""
    W_enc = tensors["W_enc"]
    return gated_latents(x, W_enc, tensors["b_gate"], W_enc * tensors["r_mag"].exp(), tensors["b_mag"])


def untied_gated_encoder(tensors: Mapping[str, Tensor], cfg: Mapping[str, Any], x: Tensor) -> Tensor:
    """UNTIED_ARCHITECTURE: the magnitude path has its own W_mag."""
    return gated_latents(x, tensors["W_enc"], tensors["b_gate"], tensors["W_mag"], tensors["b_mag"])


# An untied Gated SAE (gate and magnitude read different directions) is neither SAELens "gated" (which
# ties W_mag = exp(r_mag) W_enc) nor a JumpReLU. It is exported under this name, with an extra W_mag
# tensor: f = H((x - b_dec) W_enc + b_gate) * ReLU((x - b_dec) W_mag + b_mag). SAELens refuses to load it.
UNTIED_ARCHITECTURE = "saelab_gated_untied"
# SAELens has no Gated transcoder: those are saelab-named (saelab_gated_transcoder, saelab_gated_skip_transcoder).
GATED_LAYOUT = register_layout(SAELensLayout("gated", gated_encoder))
UNTIED_GATED_LAYOUT = register_layout(SAELensLayout(UNTIED_ARCHITECTURE, untied_gated_encoder))


class GatedSAE(SAE):
    Config = GatedConfig
    saelens_architecture = "gated"
    recipe_adam_betas = (0.0, 0.999)

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        self.cfg: GatedConfig = cfg
        self.W_enc = nn.Parameter(self.init_decoder_and_tied_encoder())  # W_gate, SAELens's name
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))
        if not cfg.tie_encoder:
            self.W_mag = nn.Parameter(self.W_enc.detach().clone())
            self.saelens_architecture = UNTIED_ARCHITECTURE
        elif cfg.r_mag:
            self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        else:
            self.register_buffer("r_mag", torch.zeros(self.d_sae))  # exported, never trained

    @property
    def frozen_decoder(self) -> bool:
        """Whether the gate's terms (sparsity, L_aux) treat the decoder as a constant.

        True for the paper's `frozen_decoder` and also for `none`, so that ablation removes only L_aux.
        """
        return self.cfg.aux_loss != "unfrozen_decoder"

    def preacts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(pi_gate, pi_gate_sg, pi_mag), with one encoder matmul when the encoder is tied.

        pi_gate_sg equals pi_gate in value but sends no gradient to b_dec through the centring. The
        matmul sees x - sg(b_dec); b_dec's centring gradient is routed back, for pi_gate and pi_mag only,
        through a zero-valued term (b_dec - sg(b_dec)) W_gate: a [d_sae] vector, so this costs no extra pass.
        """
        cfg = self.cfg
        if self.centres_input:
            z_sg = (x - self.b_dec.detach()) @ self.W_enc
            z = z_sg - (self.b_dec - self.b_dec.detach()) @ self.W_enc
        else:
            z_sg = z = x @ self.W_enc
        if cfg.tie_encoder:
            pi_mag = self.r_mag.exp() * z + self.b_mag
        else:
            pi_mag = self.centre(x) @ self.W_mag + self.b_mag
        return z + self.b_gate, z_sg + self.b_gate, pi_mag

    def encode(self, x: Tensor) -> Tensor:
        """Evaluation latents: a sigmoid gate is binarised at 0.5 (pi_gate > 0), so L0 is an honest count."""
        pi_gate, _, pi_mag = self.preacts(x)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def gate_activation(self, pi_gate: Tensor) -> Tensor:
        """What the sparsity term penalises: ReLU(pi_gate), or the sigmoid gate itself."""
        if self.cfg.gate == "heaviside":
            return torch.relu(pi_gate)
        return torch.sigmoid(pi_gate / self.cfg.gate_temperature)

    def training_loss(self, x: Tensor, coefficients: Mapping[str, float], target: Tensor | None = None
                      ) -> TrainStep:
        t = self.reconstruction_target(x, target)
        cfg = self.cfg
        if (cfg.gate == "heaviside" and cfg.tie_encoder and cfg.sparsity == "l1" and self.frozen_decoder
                and self.fused_ok(x)):
            return self.fused_training_loss(x, t, coefficients)
        pi_gate, pi_gate_sg, pi_mag = self.preacts(x)
        mag = torch.relu(pi_mag)
        hard = (pi_gate > 0).to(mag.dtype) * mag  # what `encode` returns: L0 and dead-latent bookkeeping
        f = hard if cfg.gate == "heaviside" else self.gate_activation(pi_gate) * mag
        terms = {"rec": squared_error(t, self.decode(f))}

        gate_pre = pi_gate_sg if self.frozen_decoder else pi_gate
        gate = self.gate_activation(gate_pre)
        if cfg.sparsity == "ri_l1":
            # Authors' rule: a decoder frozen in L_aux must be frozen in the penalty too (SAELens #539/#545).
            norms = self.decoder_norms()
            penalty = gate @ (norms.detach() if self.frozen_decoder else norms)
        else:
            penalty = gate.sum(-1)
        terms["sparsity"] = coefficients["sparsity"] * penalty.mean()

        if cfg.aux_loss != "none":
            W_dec, b_dec, aux_target = self.W_dec, self.b_dec, t
            if self.frozen_decoder:  # frozen: the decoder and a transcoder's skip path (through t)
                W_dec, b_dec, aux_target = W_dec.detach(), b_dec.detach(), t.detach()
            terms["aux"] = squared_error(aux_target, torch.relu(gate_pre) @ W_dec + b_dec)
        return TrainStep(terms, hard.detach())

    def fused_training_loss(self, x: Tensor, t: Tensor, coefficients: Mapping[str, float]) -> TrainStep:
        """training_loss for the default configuration through fused_gated.GatedFunction (same terms and grads); t is
        what it reconstructs (reconstruction_target)."""
        if self.centres_input:
            bias_gate = self.b_gate - self.b_dec.detach() @ self.W_enc
            shift_mag = -(self.b_dec @ self.W_enc)
        else:
            bias_gate, shift_mag = self.b_gate, torch.zeros_like(self.b_gate)
        aux = self.cfg.aux_loss != "none"
        x_hat, f, penalty, aux_hat, fired = GatedFunction.apply(
            x, self.W_enc, bias_gate, shift_mag, self.r_mag, self.b_mag, self.W_dec, self.b_dec, aux,
            tuple(self.workspace(name, x) for name in ("z", "gate", "f", "grad_mag", "grad_gate")))
        terms = {"rec": squared_error(t, x_hat), "sparsity": coefficients["sparsity"] * penalty}
        if aux:
            terms["aux"] = squared_error(t.detach(), aux_hat)  # the frozen decoder's skip path is frozen too
        return TrainStep(terms, f, fired_mask=fired)

    # -- export --------------------------------------------------------------------------------------------
    def export_tensors(self, scale: float) -> dict[str, Tensor]:
        """SAELens "gated" tensors (or the untied layout described at UNTIED_ARCHITECTURE)."""
        tensors = {
            "W_enc": self.W_enc.detach().clone(),
            "W_dec": self.W_dec.detach().clone(),
            "b_gate": self.b_gate.detach() * scale,
            "b_mag": self.b_mag.detach() * scale,
            "b_dec": self.b_dec.detach() * scale,
        }
        if self.cfg.tie_encoder:
            tensors["r_mag"] = self.r_mag.detach().clone()
        else:
            tensors["W_mag"] = self.W_mag.detach().clone()
        return tensors

    @torch.no_grad()
    def export_as_jumprelu_tensors(self, scale: float) -> dict[str, Tensor]:
        """The equivalent SAELens "jumprelu" tensors (tied encoder; either gate, as `encode` binarises).

        With s = W_gate x_c: pi_gate > 0 <=> exp(r) s > -exp(r) b_gate <=> pi_mag > b_mag - exp(r) b_gate.
        So f = pi_mag 1[pi_mag > theta] 1[pi_mag > 0] with theta = b_mag - exp(r) b_gate, which is a JumpReLU
        of pi_mag with threshold max(theta, 0) (where theta < 0 the ReLU decides, and a zero threshold
        is a ReLU). W_enc = W_mag = exp(r) W_gate and b_enc = b_mag.
        """
        if not self.cfg.tie_encoder:
            raise ValueError("an untied Gated SAE (sae.tie_encoder=false) has no JumpReLU equivalent: "
                             "its gate and magnitude read different directions")
        gain = self.r_mag.detach().exp()
        return {
            "W_enc": self.W_enc.detach() * gain,
            "W_dec": self.W_dec.detach().clone(),
            "b_enc": self.b_mag.detach() * scale,
            "b_dec": self.b_dec.detach() * scale,
            "threshold": torch.relu(self.b_mag.detach() - gain * self.b_gate.detach()) * scale,
        }
