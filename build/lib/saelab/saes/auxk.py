"""AuxK (Gao et al. 2024; SPEC section 4): dead latents fit what the main reconstruction missed.

Dead latents (not fired in the last `dead_window_tokens` tokens) reconstruct the main model's residual
e = sg(x - x_hat) from the top k_aux pre-activations among them, e_hat = W_dec z_aux (no bias).
Gao et al. add normalised MSEs, L = ||x - x_hat||^2 / V_x + alpha ||e - e_hat||^2 / V_e (V the summed variance
about the batch mean). saelab's L_rec is the plain E_b ||x - x_hat||^2 (SPEC section 0), so the AuxK term is
that loss times V_x / B: alpha ||e - e_hat||^2 / V_e * E_b ||x - mean_b(x)||^2. The ratio of the two terms is
then Gao et al.'s at any input scale (data.normalize), and alpha = 1/32 means what it means in the paper.
z_aux uses raw pre-activations by default (`auxk_relu: false`): on the synthetic benchmark a ReLU there (Gao et
al.'s reference code) left 57% of latents dead against 17% without it, at the same FVU and feature recovery
(docs/RESULTS.md). The term is scaled by min(n_dead / k_aux, 1) (`auxk_dead_scaling: true`, as the SPEC,
SAELens and sparsify do); it made no measurable difference there, where n_dead exceeded k_aux.

A step that must keep fixed shapes (an accelerator's) selects over each band of latents with the live ones at
-inf (masked_auxk_loss); elsewhere over the dead latents' columns alone. Both give the same loss and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from saelab.kernels.selection import fixed_shapes, per_token_topk
from saelab.kernels.sparse_products import SparseDecode, SparsePattern
from saelab.saes.active_latents import ActiveLatents, Residual, Selection
from saelab.saes.dead_latents import DeadLatentCounters


@torch.no_grad()
def input_variance(x: Tensor) -> Tensor:
    """E_b ||x - mean_b(x)||^2: the batch's variance about its mean, summed over dimensions (a constant)."""
    return (x - x.mean(0)).pow(2).sum(-1).mean()


class AuxKLoss(DeadLatentCounters):
    """The AuxK term of a TopK-style SAE (a base of topk.TopKSAE, whose knobs and parameters it reads: cfg's
    auxk_* fields and dead_window_tokens, k_aux, W_enc, W_dec, and attach_gradient for the fused path)."""

    cfg: Any
    k_aux: int
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    attach_gradient: Callable[..., SparsePattern]  # (active, x, relu=True): TopKSAE's

    def auxk_terms(self, selection: Selection, dead: Tensor, residuals: list[Residual], t: Tensor) -> Tensor:
        """The AuxK loss (before alpha), summed over the residuals: each one's dead latents (those in its range of
        latent ids) reconstruct it. Zero while nothing in range is dead."""
        total = t.new_zeros(())
        variance = None
        if fixed_shapes(t):  # the same loss with fixed shapes: no count of the dead latents reaches the host
            if self.none_dead(self.cfg.dead_window_tokens):  # proven on the host: zero, as below
                return total
            variance = input_variance(t)
            for residual in residuals:
                total = total + self.masked_auxk_loss(selection, dead, residual, t, variance)
            return total
        for residual in residuals:
            dead_ids = dead[residual.start:residual.stop].nonzero().squeeze(1) + residual.start
            if dead_ids.numel() == 0:
                continue
            variance = input_variance(t) if variance is None else variance
            if selection.pattern is not None:
                dead_pre, dead_bias = self.dead_preacts(selection.x, dead_ids, selection.pre, selection.pre_bias,
                                                        selection.bias)
                total = total + self.auxk_loss(dead_pre, dead_ids, residual.of(t), variance, selection.x, dead_bias)
            else:
                total = total + self.auxk_loss(selection.pre[:, dead_ids], dead_ids, residual.of(t), variance)
        return total

    @torch.no_grad()
    def dead_preacts(self, x: Tensor, dead_ids: Tensor, pre: Tensor | None, pre_bias: Tensor | None,
                     bias: Tensor) -> tuple[Tensor, Tensor | None]:
        """The dead latents' pre-activations for AuxK and the bias still to add to them (or None): taken from pi,
        or, after the bf16 screen (pre None), an exact float32 matmul over the dead latents' columns alone."""
        if pre is None:
            return torch.mm(x, self.W_enc[:, dead_ids]), bias[dead_ids]
        return pre[:, dead_ids], (pre_bias[dead_ids] if pre_bias is not None else None)

    def auxk_loss(self, dead_pre: Tensor, dead_ids: Tensor, residual: Tensor, input_variance: Tensor,
                  x: Tensor | None = None, dead_bias: Tensor | None = None) -> Tensor:
        """||e - W_dec z_aux||^2 / ||e - mean(e)||^2 * E_b||x - mean(x)||^2 (`input_variance`, see the module
        docstring), z_aux = top min(k_aux, n_dead) dead pre-activations.

        dead_pre [B, n_dead] are the pre-activations of the latents dead_ids (+ dead_bias, if given apart). With
        the batch x (the fused path: dead_pre has no gradient) the entries get their gradient sparsely.
        """
        cfg = self.cfg
        rows, local, values = per_token_topk(dead_pre, min(self.k_aux, dead_ids.numel()), dead_bias)
        aux = ActiveLatents(rows, dead_ids[local], values, dead_pre.shape[0], self.d_sae)
        if x is not None:
            pattern = self.attach_gradient(aux, x, relu=cfg.auxk_relu)
            e_hat = SparseDecode.apply(aux.values, self.W_dec, pattern)
        else:
            if cfg.auxk_relu:
                aux.values = aux.values.relu()
            e_hat = aux.decode(self.W_dec)
        return self.auxk_fit(residual, e_hat, input_variance, dead_ids.numel())

    def auxk_fit(self, residual: Tensor, e_hat: Tensor, input_variance: Tensor, n_dead: int | Tensor) -> Tensor:
        """||e - e_hat||^2 / ||e - mean(e)||^2 * input_variance, times min(n_dead / k_aux, 1) (auxk_dead_scaling)."""
        variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = (residual - e_hat).pow(2).sum() / variance * input_variance
        if self.cfg.auxk_dead_scaling:  # fewer dead latents than k_aux: a proportionally smaller term
            loss = loss * (n_dead / self.k_aux if isinstance(n_dead, Tensor) else min(n_dead / self.k_aux, 1.0))
        return loss

    def masked_auxk_loss(self, selection: Selection, dead: Tensor, residual: Residual, t: Tensor,
                         input_variance: Tensor) -> Tensor:
        """auxk_loss for one residual, in shapes that do not depend on the data (what a GPU step needs): the top k
        of its band's pre-activations with the band's live latents at -inf (auxk_width's k), then the entries beyond
        the dead count zeroed. k is at least min(k_aux, n_dead), so the kept entries are auxk_loss's top
        min(k_aux, n_dead) dead ones and the loss and its gradients are the same; zero while nothing is dead."""
        start, stop = residual.start, residual.stop
        band_dead = dead[start:stop]
        n_dead = band_dead.sum()
        k = self.auxk_width(stop - start)
        if k == 0:  # the host's bound says nothing is dead
            return t.new_zeros(())
        pre = self.band_preacts(selection, start, stop)
        rows, local, values = per_token_topk(pre.masked_fill(~band_dead, float("-inf")), k)
        aux = ActiveLatents(rows, local + start, values, pre.shape[0], self.d_sae)
        kept = band_dead[local]  # False only where fewer than k latents are dead
        if selection.pattern is not None:
            pattern = self.attach_gradient(aux, selection.x, relu=self.cfg.auxk_relu)
            e_hat = SparseDecode.apply(torch.where(kept, aux.values, 0.0), self.W_dec, pattern)
        else:
            aux.values = torch.where(kept, aux.values.relu() if self.cfg.auxk_relu else aux.values, 0.0)
            e_hat = aux.decode(self.W_dec)
        n = n_dead.clamp(max=self.k_aux).to(t.dtype)
        return self.auxk_fit(residual.of(t), e_hat, input_variance, n) * (n_dead > 0)

    def auxk_width(self, band: int) -> int:
        """Entries per token of the fixed-shape AuxK selection over a band of latents: min(k_aux, band width, the
        host's bound on the dead latents (dead_bound; unknown: no cap)). Without the bound every token takes
        k_aux entries (d_in / 2 by default) however few latents are dead, nearly all of them zeroed -inf ties."""
        k = min(self.k_aux, band)
        bound = self.dead_bound(self.cfg.dead_window_tokens)
        return k if bound is None else min(k, bound)

    def band_preacts(self, selection: Selection, start: int, stop: int) -> Tensor:
        """The pre-activations of latents [start, stop), bias included, for AuxK: columns of the selection's pi (a
        matmul over those columns after the bf16 screen, which keeps no pi); with their gradient on the autograd
        path, without it on the fused one (attach_gradient gives the selected entries theirs)."""
        if selection.pattern is None:
            return selection.pre[:, start:stop]
        with torch.no_grad():
            if selection.pre is None:
                return torch.mm(selection.x, self.W_enc[:, start:stop]) + selection.bias[start:stop]
            pre = selection.pre[:, start:stop]
            return pre if selection.pre_bias is None else pre + selection.pre_bias[start:stop]

    def dead_count_window(self) -> int | None:
        """AuxK's window: the host's bound on its dead latents caps auxk_width (logging steps read it)."""
        return int(self.cfg.dead_window_tokens) if self.cfg.auxk_alpha > 0 else None
