"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv 2503.17547): nested dictionaries in one.

The latents are split at widths w_1 < w_2 < ... < w_M = d_sae. One BatchTopK selection runs over all latents
(batchtopk.py: the B*k largest entries of ReLU(W_enc (x - b_dec) + b_enc) in the batch); then every prefix of
the dictionary must reconstruct the input on its own:

    x_hat_m = b_dec + sum_{i < w_m} f_i d_i            L_rec = sum_m c_m E_b ||x - x_hat_m||^2

(c_m = 1 by default, as in the paper and SAELens; `matryoshka_weights` sets them). A latent in an early
prefix is trained by every level, so general features settle there and the later latents add detail instead
of absorbing it. The prefixes are decoded sparsely: level m adds the active entries with ids in [w_{m-1}, w_m)
to x_hat_{m-1}, so the cost is one sparse decode of the B*k entries in total plus M passes over [B, d_in].

AuxK is adapted to the prefixes (SAELens's `use_matryoshka_aux_loss`): the dead latents of level m's band
[w_{m-1}, w_m) reconstruct that level's residual sg(x - x_hat_m), each band with TopK's normalised AuxK
(topk.py) and its own min(n_dead / k_aux, 1) scaling; the terms are summed. Evaluation uses the BatchTopK
threshold theta, and the SAE exports as SAELens "jumprelu" (as BatchTopK does).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.kernels.dispatch import host_sync_free
from saelab.kernels.fused import SparseDecode, SparsePattern
from saelab.saes.base import squared_error
from saelab.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.saes.topk import ActiveLatents, Residual, Selection


@dataclass
class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    matryoshka_widths: list[int] | None = None  # prefix widths, increasing, ending at d_sae; null = d_sae/64,/16,/4,1
    matryoshka_weights: list[float] | None = None  # c_m per level (null = all 1)

    def validate(self) -> None:
        super().validate()
        widths = self.widths()
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError("sae.matryoshka_widths", self.matryoshka_widths, "a list of positive integers")
        if any(b <= a for a, b in itertools.pairwise(widths)) or widths[-1] != self.width:
            raise ConfigError("sae.matryoshka_widths", self.matryoshka_widths,
                              f"strictly increasing widths ending at d_sae ({self.width})")
        if self.matryoshka_weights is not None:
            weights = list(self.matryoshka_weights)
            if len(weights) != len(widths) or any(
                    isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0 for c in weights):
                raise ConfigError("sae.matryoshka_weights", self.matryoshka_weights,
                                  f"null or {len(widths)} non-negative numbers (one per width)")

    def widths(self) -> list[int]:
        if self.matryoshka_widths is not None:
            return list(self.matryoshka_widths)
        return sorted({max(1, self.width // 64), max(1, self.width // 16), max(1, self.width // 4), self.width})


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    Config = MatryoshkaBatchTopKConfig

    def __init__(self, cfg: MatryoshkaBatchTopKConfig):
        super().__init__(cfg)
        self.widths = cfg.widths()
        self.level_weights = [float(c) for c in cfg.matryoshka_weights or [1.0] * len(self.widths)]

    def reconstruction_terms(self, selection: Selection, t: Tensor) -> tuple[dict[str, Tensor], list[Residual]]:
        """c_m E_b ||t - x_hat_m||^2 per level ("rec" for the whole dictionary, "rec_<w_m>" for the prefixes), and
        each level's residual for the band of latents it adds."""
        active, terms, residuals = selection.active, {}, []
        x_hat, start = self.b_dec.expand_as(t), 0
        for width, weight in zip(self.widths, self.level_weights, strict=True):
            x_hat = x_hat + self.band_decode(active, selection.pattern, start, width)
            name = "rec" if width == self.d_sae else f"rec_{width}"
            terms[name] = weight * squared_error(t, x_hat)
            residuals.append(Residual(start, width, prediction=x_hat.detach()))
            start = width
        return terms, residuals

    def band_decode(self, active: ActiveLatents, pattern: SparsePattern | None, start: int, stop: int) -> Tensor:
        """sum of f_i d_i over the active entries with start <= i < stop, per token (only those rows of W_dec are
        read). The entries stay grouped by token, so the band is a sparse matrix of the same kind."""
        keep = (active.latents >= start) & (active.latents < stop)
        if pattern is not None and host_sync_free(active.values):  # fixed shapes: zero the entries off the band
            return SparseDecode.apply(torch.where(keep, active.values, 0.0), self.W_dec, pattern)
        band = ActiveLatents(active.rows[keep], active.latents[keep], active.values[keep], active.batch_size,
                             active.d_sae)
        if pattern is None:
            return band.decode(self.W_dec)
        return SparseDecode.apply(band.values, self.W_dec, SparsePattern(band.rows, band.latents, band.batch_size,
                                                                          band.d_sae))

    def export_config(self) -> dict[str, Any]:
        return {**super().export_config(), "matryoshka_widths": list(self.widths)}

