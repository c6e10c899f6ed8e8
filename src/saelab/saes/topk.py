"""TopK SAE (Gao et al. 2024; SPEC section 4): z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)), plus AuxK (auxk.py).

Sparsity is set by k, so there is no sparsity coefficient to schedule. Training is sparse after the encoder
matmul: x_hat is a weighted sum of each token's k selected decoder rows, and the backward pass
(reconstruction.SparseReconstructionError, sparse_products.SparseGather) computes dW_dec, dW_enc and the
latents' gradients from the B k selected entries alone, so only one dense [B, d_in] x [d_in, d_sae] matmul runs
per step (dense SAEs run five). The selection is kernels/selection.py's, which picks the fastest exact kernel
for the tensors (C++ on a float32 CPU, torch operators elsewhere). On CPUs with bf16 dot products even the
encoder matmul runs in bf16, as a screen that the exact float32 selection then settles
(TopKSAE.screened_select).

Exported, it is SAELens's "topk" layout, whose encoder (topk_encoder) this file declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError, check_bool, check_positive
from saelab.kernels.reconstruction import SparseReconstructionError
from saelab.kernels.selection import (
    Screen,
    bf16_screen,
    per_token_topk,
    screened_row_topk,
    selection_adds_bias,
)
from saelab.kernels.sparse_products import SparseGather, SparsePattern
from saelab.saes.active_latents import ActiveLatents, Residual, Selection
from saelab.saes.auxk import AuxKLoss
from saelab.saes.base import SAE, SAEConfig, TrainStep, squared_error
from saelab.saes.saelens_layout import SAELensLayout, register_layout


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32  # active latents per token
    auxk_alpha: float = 1 / 32  # weight of the AuxK loss (0 disables it)
    k_aux: int | None = None  # dead latents AuxK uses per token; null = d_in // 2 (capped at the dead count)
    dead_window_tokens: int = 100_000  # AuxK's notion of dead: not fired in the last this-many tokens
    auxk_relu: bool = False  # ReLU on the dead latents' pre-activations in z_aux (Gao et al.'s reference code)
    auxk_dead_scaling: bool = True  # times min(n_dead / k_aux, 1) (SPEC, SAELens, sparsify)
    bf16_screen: bool = True  # CPU float32 training: top-k candidates from a bf16 matmul (see screened_select)

    def validate(self) -> None:
        super().validate()
        check_positive("sae.k", self.k, integer=True)
        if self.k > self.width:
            raise ConfigError("sae.k", self.k, f"at most d_sae ({self.width})")
        check_positive("sae.auxk_alpha", self.auxk_alpha, allow_zero=True)
        if self.k_aux is not None:
            check_positive("sae.k_aux", self.k_aux, integer=True)
        check_positive("sae.dead_window_tokens", self.dead_window_tokens, integer=True)
        check_bool("sae.auxk_relu", self.auxk_relu)
        check_bool("sae.auxk_dead_scaling", self.auxk_dead_scaling)
        if not isinstance(self.bf16_screen, bool):
            raise ConfigError("sae.bf16_screen", self.bf16_screen, "true or false")
        if self.target_l0 is not None:  # k is the L0: target_l0 sets it, so one sweep key matches every variant
            check_positive("sae.target_l0", self.target_l0)
            if round(self.target_l0) < 1 or round(self.target_l0) > self.width:
                raise ConfigError("sae.target_l0", self.target_l0, f"a number in [1, d_sae ({self.width})]")
        if self.sparsity_coefficient != 0:
            raise ConfigError("sae.sparsity_coefficient", self.sparsity_coefficient,
                              "0 (sae.k sets the sparsity)")


def topk_encoder(tensors: Mapping[str, Tensor], cfg: Mapping[str, Any], x: Tensor) -> Tensor:
    """SAELens "topk": the k largest of ReLU(x W_enc + b_enc) per token, the rest 0 (x centred as cfg says)."""
    acts = torch.relu(x @ tensors["W_enc"] + tensors["b_enc"])
    top = acts.topk(int(cfg["k"]), dim=-1)
    return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)


TOPK_LAYOUT = register_layout(SAELensLayout("topk", topk_encoder))  # transcoders: saelab_topk_[skip_]transcoder


class TopKSAE(SAE, AuxKLoss):
    Config = TopKConfig
    saelens_architecture = "topk"
    recipe_adam_betas = (0.9, 0.999)
    rescalable_decoder = True  # k sets the sparsity: the latents' scale enters no penalty
    elementwise_encoder = False  # each token's k largest: a latent's fate depends on the others

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.init_decoder_and_tied_encoder())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.k = int(round(cfg.target_l0)) if cfg.target_l0 is not None else int(cfg.k)
        # d_model / 2 (Gao et al.); a CLT's d_in is L layers side by side, so its k_aux is one layer's d / 2
        model_width = int(cfg.d_in) if self.layer_structure is not None else self.d_in
        self.k_aux = int(cfg.k_aux) if cfg.k_aux is not None else max(1, model_width // 2)

    @property
    def scheduled_coefficients(self) -> dict[str, tuple[float, int]]:
        return {}  # k sets the sparsity; alpha is a constant

    def pre_activations(self, x: Tensor) -> Tensor:
        """W_enc (x - b_dec) + b_enc, computed as x W_enc + (b_enc - b_dec W_enc) outside autocast.

        Equal, but b_dec's encoder gradient then costs a vector-matrix product instead of a third
        [B, d_in] x [d_in, d_sae] matmul (about a fifth of a training step). Under autocast the
        subtraction could cancel in low precision, so there the input is centred first.
        """
        return self.encoder_preacts(x, self.W_enc, self.b_enc)

    def select(self, pre: Tensor, bias: Tensor | None = None) -> ActiveLatents:
        """Each token's k largest of pre (+ bias, if given: a C++ kernel adds it as it scans).
        TopK then ReLU == TopK of ReLU (ReLU is monotone), a pass less."""
        rows, latents, values = per_token_topk(pre, self.k, bias)
        return ActiveLatents(rows, latents, values.relu(), pre.shape[0], pre.shape[1])

    def screened_select(self, x: Tensor, bias: Tensor) -> ActiveLatents | None:
        """The training selection of x W_enc + bias found through a bfloat16 screen (selection.bf16_screen), or
        None where it does not apply (sae.bf16_screen false, not CPU float32, or a CPU without bf16 dot products).

        On such CPUs a bf16 matmul runs ~2.6x faster than the float32 one, and its output is within a proven
        bound of the float32 pre-activations; the kernel computes exact float32 values only for the entries
        whose bound reaches the selection's threshold (1.4-2.5 k per token here) and selects among them, so the latents
        are the float32 top-k (the kernels' tests check equality).
        """
        self.screen_candidates_per_token = None  # this step's, for diagnostics (benchmarks/train_step.py)
        if self.layer_structure is not None:  # a CLT: the screen would multiply its zero blocks too
            return None
        screen = bf16_screen(x, self.W_enc, bias, self.cfg.bf16_screen,
                             lambda: self.workspace("screen", x, torch.bfloat16))
        selected = self.select_screened(screen) if screen is not None else None
        if selected is None:
            return None
        active, candidates = selected
        self.screen_candidates_per_token = candidates / x.shape[0]
        return active

    def select_screened(self, screen: Screen) -> tuple[ActiveLatents, int] | None:
        """(the selection, how many exact values the kernel computed), or None if the kernel declined."""
        found = screened_row_topk(screen, self.k)
        if found is None:
            return None
        ids, values, candidates = found
        batch = ids.shape[0]
        rows = torch.arange(batch).repeat_interleave(self.k)
        return ActiveLatents(rows, ids.flatten(), values.flatten().relu(), batch, self.d_sae), candidates

    def encode(self, x: Tensor) -> Tensor:
        """Latents for tokens of any leading shape (the selection itself works on [tokens, d_in])."""
        flat = x.reshape(-1, self.d_in)
        return self.select(self.pre_activations(flat)).dense().reshape(*x.shape[:-1], self.d_sae)

    def reconstruct(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.d_in)
        return (self.select(self.pre_activations(flat)).decode(self.W_dec) + self.b_dec).reshape(
            *x.shape[:-1], self.d_out)

    def training_loss(self, x: Tensor, coefficients: Mapping[str, float], target: Tensor | None = None
                      ) -> TrainStep:
        t = self.reconstruction_target(x, target)
        selection = self.training_selection(x)
        terms, residuals = self.reconstruction_terms(selection, t)
        dead = self.dead_mask(self.cfg.dead_window_tokens)
        if self.cfg.auxk_alpha > 0:
            terms["auxk"] = self.cfg.auxk_alpha * self.auxk_terms(selection, dead, residuals, t)
        active = selection.active
        extras = {"dead_latents": dead.sum().float(), **self.update_from_batch(active)}
        # The latents stay sparse: firing statistics come from the active entries (TrainStep.fired).
        return TrainStep(terms, active.detach(), extras)

    def training_selection(self, x: Tensor) -> Selection:
        """The batch's selected latents, with their gradient attached.

        Fused (float, no autocast): sparse after the encoder matmul. pi is computed without autograd, only the
        selected entries get a gradient (sparse_products.SparseGather), and the reconstruction decodes them
        sparsely (reconstruction.SparseReconstructionError), so no dense [B, d_sae] gradient or dense dW_enc
        matmul is ever built.
        Otherwise autograd runs through the dense pre-activations.
        """
        if not self.fused_ok(x):
            pre = self.pre_activations(x)
            return Selection(x, self.select(pre), pre)
        with torch.no_grad():
            # The encoder bias with b_dec folded in; SparseGather gives the parameters their gradients.
            bias = self.folded_bias(self.W_enc, self.b_enc)
            active, pre, pre_bias = self.screened_select(x, bias), None, None
            if active is None:
                pre, pre_bias = self.float32_preacts(x, bias)
                active = self.select(pre, pre_bias)
        pattern = self.attach_gradient(active, x)
        return Selection(x, active, pre, pattern, bias, pre_bias)

    def reconstruction_terms(self, selection: Selection, t: Tensor) -> tuple[dict[str, Tensor], list[Residual]]:
        """{"rec": E_b ||t - x_hat||^2}, and the residual sg(t - x_hat) AuxK's dead latents (all of them) fit."""
        active = selection.active
        if selection.pattern is not None:
            rec, diff = SparseReconstructionError.apply(active.values, self.W_dec, self.b_dec, t, selection.pattern)
            return {"rec": rec}, [Residual(0, self.d_sae, diff.neg())]
        x_hat = active.decode(self.W_dec) + self.b_dec
        return {"rec": squared_error(t, x_hat)}, [Residual(0, self.d_sae, prediction=x_hat.detach())]

    def float32_preacts(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor | None]:
        """(pi, the bias still to add to it, or None): x W_enc into a reused buffer. Where the selection adds the
        bias as it scans (a C++ kernel), addmm is spared a pass that writes it into pi; elsewhere addmm adds it.
        A CLT's product runs over its encoder's diagonal blocks alone (self.products)."""
        if selection_adds_bias(x, bias):
            return self.products.encode(x, self.W_enc, out=self.workspace("pre", x)), bias
        return self.products.encode(x, self.W_enc, bias, out=self.workspace("pre", x)), None

    def attach_gradient(self, active: ActiveLatents, x: Tensor, relu: bool = True) -> SparsePattern:
        """Give the selected entries, whose values were taken from pi = x W_enc + folded bias without autograd,
        their sparse gradient (to W_enc, b_enc and b_dec); returns their SparsePattern for the decoder.

        active.values become the values with a gradient, after a ReLU if `relu`. The selection's values may
        already be ReLU'd: ReLU(ReLU(p)) = ReLU(p), and its backward masks the same entries (where p <= 0).
        """
        spans = (self.layer_structure.spans(self.d_in, self.d_sae, self.d_out) if self.layer_structure is not None
                 else (None, None))  # a CLT's zero blocks, which the sparse products skip
        pattern = SparsePattern(active.rows, active.latents, active.batch_size, active.d_sae, *spans)
        b_dec = self.b_dec if self.centres_input else None
        values = SparseGather.apply(x, self.W_enc, self.b_enc, b_dec, active.values, pattern)
        active.values = values.relu() if relu else values
        return pattern

    def update_from_batch(self, active: ActiveLatents) -> dict[str, Tensor]:
        """Per-batch state updates from the training selection (none for TopK); returns extras to log."""
        return {}

    def export_tensors(self, scale: float) -> dict[str, Tensor]:
        return self.standard_tensors(scale)

    def export_config(self) -> dict[str, Any]:
        return {**super().export_config(), "k": self.k}
