"""BatchTopK SAE (Bussmann et al. 2024; SPEC section 4): TopK over the whole batch, JumpReLU at inference.

Training keeps the B*k largest entries of the flattened [B, d_sae] matrix ReLU(W_enc (x - b_dec) + b_enc),
so tokens share a budget of k latents on average. That makes a token's latents depend on its batch, so
evaluation instead uses one global threshold theta, an exponential moving average of the smallest kept
activation per training batch: f_i = pi_i H(pi_i - theta). L0 is then an honest per-token count, and the
model exports as a SAELens "jumprelu" SAE whose per-latent thresholds all equal theta (times the scale).
AuxK, the sparse decoder and the dead-latent window are TopK's (see topk.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.kernels import native
from saelab.kernels.dispatch import host_sync_free
from saelab.saes.topk import ActiveLatents, TopKConfig, TopKSAE, chunked_topk

# The torch fallback searches entries above 0.8 theta first, then above lower cutoffs, then all (exact either way).
CANDIDATE_FRACTIONS = (0.8, 0.4, 0.1)


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

    def select_screened(self, screen: native.Screen) -> tuple[ActiveLatents, int] | None:
        found = native.screened_batch_topk(screen, screen.approx.shape[0] * self.k)
        if found is None:
            return None
        flat_ids, values, candidates = found
        batch, d_sae = screen.approx.shape
        return ActiveLatents(flat_ids // d_sae, flat_ids % d_sae, values.relu(), batch, d_sae), candidates

    def batch_topk(self, pre: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(flat indices in ascending order, i.e. grouped by token; values) of the B*k largest entries of pre
        (+ bias [d_sae], if given).

        On CPU in float32 this is native.batch_topk (sparse_kernels.cpp), which estimates its own cutoff from a
        sample. The fallback here: a topk over all B*d_sae entries costs about as much as the encoder matmul
        (0.11 s at B 2048, d_sae 3072, one CPU core). Entries at or below a cutoff c can only be kept if fewer
        than B*k lie above it, so with c = 0.8 theta the topk runs over the few entries above c (0.016 s). While the
        pre-activations shift (early in training, at a high learning rate) theta can lag above this batch's
        threshold; the lower cutoffs then still avoid the full topk, the last resort.
        """
        n_keep = pre.shape[0] * self.k
        found = native.batch_topk(pre, n_keep, bias)
        if found is not None:
            ids, values = found
            return ids, (pre.flatten()[ids] if pre.requires_grad else values)  # the kernel's carry no gradient
        flat = (pre if bias is None else pre + bias).flatten()
        ids = None
        if not host_sync_free(flat) and self.threshold_batches > 0:  # a data-dependent search: CPU only
            for fraction in CANDIDATE_FRACTIONS:
                candidates = (flat > fraction * self.threshold).nonzero().squeeze(1)
                if candidates.numel() >= n_keep:
                    ids = candidates[chunked_topk(flat[candidates], n_keep)]
                    break
        if ids is None:
            ids = chunked_topk(flat, n_keep)
        ids = ids.sort().values
        return ids, flat[ids]

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
