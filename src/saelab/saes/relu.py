"""ReLU SAE, the baseline (SPEC section 1): f = ReLU(W_enc (x - b_dec) + b_enc).

Exported, it is SAELens's "standard" layout (and "transcoder", "skip_transcoder"), declared here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import check_choice
from saelab.kernels.fused_relu import ReluL1Function
from saelab.saes.base import SAE, SAEConfig, TrainStep, squared_error
from saelab.saes.saelens_layout import SAELensLayout, register_layout


@dataclass
class ReluConfig(SAEConfig):
    sparsity: str = "l1"  # l1: lambda ||f||_1 | ri_l1: lambda sum_i f_i ||d_i|| (April-2024 update)

    def validate(self) -> None:
        super().validate()
        check_choice("sae.sparsity", self.sparsity, ("l1", "ri_l1"))
        if self.sparsity == "ri_l1":
            self.require_free_decoder_norms(self.sparsity)

    def scale_dependent(self) -> dict[str, int]:
        return {"sparsity_coefficient": 1}  # an L1 penalty (ri_l1 too: ||d_i|| is scale-free)


def standard_encoder(tensors: Mapping[str, Tensor], cfg: Mapping[str, Any], x: Tensor) -> Tensor:
    """SAELens "standard": ReLU(x W_enc + b_enc) (x centred as cfg says)."""
    return torch.relu(x @ tensors["W_enc"] + tensors["b_enc"])


STANDARD_LAYOUT = register_layout(SAELensLayout("standard", standard_encoder, transcoder="transcoder",
                                                skip_transcoder="skip_transcoder"))


class ReluSAE(SAE):
    Config = ReluConfig
    saelens_architecture = "standard"

    def __init__(self, cfg: ReluConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.init_decoder_and_tied_encoder())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.encoder_preacts(x, self.W_enc, self.b_enc))

    def training_loss(self, x: Tensor, coefficients: Mapping[str, float], target: Tensor | None = None
                      ) -> TrainStep:
        t = self.reconstruction_target(x, target)
        if self.fused_ok(x):
            bias = self.folded_bias(self.W_enc, self.b_enc)
            weight = None if self.cfg.sparsity == "l1" else self.decoder_norms()
            x_hat, f, penalty, fired = ReluL1Function.apply(x, self.W_enc, bias, self.W_dec, self.b_dec,
                                                            (self.workspace("f", x), self.workspace("grad_f", x)),
                                                            weight, self.products)
            terms = {"rec": squared_error(t, x_hat), "sparsity": coefficients["sparsity"] * penalty}
            return TrainStep(terms, f, fired_mask=fired)
        f = self.encode(x)
        x_hat = self.decode(f)
        if self.cfg.sparsity == "l1":
            penalty = f.sum(-1).mean()
        else:
            penalty = (f @ self.decoder_norms()).mean()
        return TrainStep({"rec": squared_error(t, x_hat), "sparsity": coefficients["sparsity"] * penalty}, f)

    def export_tensors(self, scale: float) -> dict[str, Tensor]:
        return self.standard_tensors(scale)
