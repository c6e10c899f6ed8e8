"""BatchTopK SAE (Bussmann et al. 2024; SPEC section 4): TopK over the whole batch, JumpReLU at inference.

Training keeps the B*k largest entries of the flattened [B, d_sae] matrix ReLU(W_enc (x - b_dec) + b_enc),
so tokens share a budget of k latents on average. That makes a token's latents depend on its batch, so
evaluation instead uses one global threshold theta, an exponential moving average of the smallest kept
activation per training batch: f_i = pi_i H(pi_i - theta). L0 is then an honest per-token count, and the
model exports as a SAELens "jumprelu" SAE whose per-latent thresholds all equal theta (times the scale).
AuxK, the sparse decoder and the dead-latent window are TopK's (see topk.py); the selection itself is
kernels/selection.py's batch_topk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.kernels.selection import Screen, batch_topk, screened_batch_topk
from saelab.saes.active_latents import ActiveLatents
from saelab.saes.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_ema_decay: float = 0.9  # theta <- decay * theta + (1 - decay) * min kept activation, per batch

    def validate(self) -> None:
        super().validate()
        if isinstance(self.threshold_ema_decay, bool) or not (
            isinstance(self.threshold_ema_decay, (int, float)) and 0 <= self.threshold_ema_decay < 1
        ):
            raise ConfigError("sae.threshold_ema_decay", self.threshold_ema_decay, "a number in [0, 1)")


class BatchTopKSAE(TopKSAE):
    Config = BatchTopKConfig
    saelens_architecture = "jumprelu"
    elementwise_encoder = True  # at inference, the learned threshold

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # The inference threshold (on the normalised scale) and how many batches have updated it.
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.long))

    def select(self, pre: Tensor, bias: Tensor | None = None) -> ActiveLatents:
        batch, d_sae = pre.shape
        if not self.training:
            if bias is not None:
                pre = pre + bias
            rows, latents = (pre > self.threshold).nonzero(as_tuple=True)  # row-major, so grouped by token
            return ActiveLatents(rows, latents, pre[rows, latents], batch, d_sae)
        flat_ids, values = self.batch_topk(pre, bias)
        return ActiveLatents(flat_ids // d_sae, flat_ids % d_sae, values.relu(), batch, d_sae)

    def select_screened(self, screen: Screen) -> tuple[ActiveLatents, int] | None:
        found = screened_batch_topk(screen, screen.approx.shape[0] * self.k)
        if found is None:
            return None
        flat_ids, values, candidates = found
        batch, d_sae = screen.approx.shape
        return ActiveLatents(flat_ids // d_sae, flat_ids % d_sae, values.relu(), batch, d_sae), candidates

    def batch_topk(self, pre: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(flat indices in ascending order, i.e. grouped by token; values) of the B*k largest entries of pre
        (+ bias [d_sae], if given); theta, once set, lets a CPU fallback search only the entries near it."""
        return batch_topk(pre, pre.shape[0] * self.k, bias, theta=self.threshold,
                          theta_batches=self.threshold_batches)

    def encode_batch_topk(self, x: Tensor) -> Tensor:
        """Latents as training selects them, over the batch x: its B k largest pre-activations (SynthSAEBench
        scores BatchTopK this way, batch by batch; `encode` uses the learned threshold instead)."""
        pre = self.pre_activations(x)
        flat_ids, values = self.batch_topk(pre)
        d_sae = pre.shape[1]
        return ActiveLatents(flat_ids // d_sae, flat_ids % d_sae, values.relu(), pre.shape[0], d_sae).dense()

    @torch.no_grad()
    def update_from_batch(self, active: ActiveLatents) -> dict[str, Tensor]:
        """Move theta towards this batch's smallest kept (positive) activation (the first such batch sets it).
        Written with device tensors only, so it never waits for the GPU."""
        if self.training:  # an eval-mode selection is thresholded by theta already
            positive = active.values > 0
            any_kept = positive.any()
            smallest = torch.where(positive, active.values, float("inf")).min().float()
            decay = torch.where(self.threshold_batches > 0, self.cfg.threshold_ema_decay, 0.0)
            moved = self.threshold * decay + (1 - decay) * smallest
            self.threshold.copy_(torch.where(any_kept, moved, self.threshold))
            self.threshold_batches.add_(any_kept.long())
        return {"threshold": self.threshold.clone()}

    @torch.no_grad()
    def import_threshold(self, threshold: Tensor) -> None:
        """BatchTopK's threshold is one number (exported once per latent); the EMA then continues from it."""
        if not torch.allclose(threshold, threshold[0].expand_as(threshold)):
            raise ConfigError("init_from", "threshold", "one threshold shared by all latents (a BatchTopK export)")
        self.threshold.fill_(float(threshold[0]))
        self.threshold_batches.fill_(1)

    def export_tensors(self, scale: float) -> dict[str, Tensor]:
        threshold = (self.threshold * scale).expand(self.d_sae).clone()  # SAELens stores one per latent
        return {**super().export_tensors(scale), "threshold": threshold}

    def export_config(self) -> dict[str, Any]:
        return {"architecture": self.saelens_architecture}
