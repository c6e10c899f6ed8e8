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
from saelab.kernels.sparse_products import SparseDecode, SparsePattern
from saelab.saes.active_latents import ActiveLatents, Residual, Selection
from saelab.saes.base import squared_error
from saelab.saes.batchtopk import BatchTopKConfig, BatchTopKSAE


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
        terms, residuals = {}, []
        x_hat, start = self.b_dec.expand_as(t), 0
        bands = self.band_decodes(selection.active, selection.pattern)
        for width, weight, band in zip(self.widths, self.level_weights, bands, strict=True):
            x_hat = x_hat + band
            name = "rec" if width == self.d_sae else f"rec_{width}"
            terms[name] = weight * squared_error(t, x_hat)
            residuals.append(Residual(start, width, prediction=x_hat.detach()))
            start = width
        return terms, residuals

    def band_decodes(self, active: ActiveLatents, pattern: SparsePattern | None) -> list[Tensor]:
        """Per level m, sum of f_i d_i over the active entries with w_{m-1} <= i < w_m, per token: one sparse
        decode of the B*k entries into B*M rows, entry (b, i) into row b M + level(i), in fixed shapes (no host
        synchronisation). A BatchTopK selection lists each token's latents in ascending order, so these rows are
        ascending too, as a sparse matrix's grouping needs, with no sort; each row sums its entries in the
        order a band's own decode would, so every prefix equals the decode of its entries alone."""
        levels = len(self.widths)
        bounds = torch.tensor(self.widths[:-1], device=active.latents.device, dtype=active.latents.dtype)
        rows = active.rows * levels + torch.bucketize(active.latents, bounds, right=True)
        by_level = ActiveLatents(rows, active.latents, active.values, active.batch_size * levels, active.d_sae)
        if pattern is None:
            decoded = by_level.decode(self.W_dec)
        else:
            decoded = SparseDecode.apply(by_level.values, self.W_dec, SparsePattern(
                by_level.rows, by_level.latents, by_level.batch_size, by_level.d_sae))
        return list(decoded.view(active.batch_size, levels, -1).unbind(1))

    def export_config(self) -> dict[str, Any]:
        return {**super().export_config(), "matryoshka_widths": list(self.widths)}

