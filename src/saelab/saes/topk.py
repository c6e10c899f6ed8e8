"""TopK SAE (Gao et al. 2024; SPEC section 4): z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)), plus AuxK.

Sparsity is set by k, so there is no sparsity coefficient to schedule. Training is sparse after the encoder
matmul: x_hat is a weighted sum of each token's k selected decoder rows, and the backward pass
(fused.SparseReconstructionError, fused.SparseGather) computes dW_dec, dW_enc and the latents' gradients from
the B k selected entries alone, so only one dense [B, d_in] x [d_in, d_sae] matmul runs per step (dense SAEs
run five). On the CPU in float32 the selection and the sparse products are kernels/native.py's C++ kernels;
elsewhere, torch operators (topk, embedding_bag, CSR products) compute the same. On CPUs with bf16 dot
products even the encoder matmul runs in bf16, as a screen that the exact float32 selection then settles
(TopKSAE.screened_select).

AuxK revives dead latents (not fired in the last `dead_window_tokens` tokens): it reconstructs the main model's
residual e = sg(x - x_hat) from the top k_aux pre-activations among dead latents, e_hat = W_dec z_aux (no bias).
Gao et al. add normalised MSEs, L = ||x - x_hat||^2 / V_x + alpha ||e - e_hat||^2 / V_e (V the summed variance
about the batch mean). saelab's L_rec is the plain E_b ||x - x_hat||^2 (SPEC section 0), so the AuxK term is
that loss times V_x / B: alpha ||e - e_hat||^2 / V_e * E_b ||x - mean_b(x)||^2. The ratio of the two terms is
then Gao et al.'s at any input scale (data.normalize), and alpha = 1/32 means what it means in the paper.
z_aux uses raw pre-activations by default (`auxk_relu: false`): on the synthetic benchmark a ReLU there (Gao et
al.'s reference code) left 57% of latents dead against 17% without it, at the same FVU and feature recovery
(docs/RESULTS.md). The term is scaled by min(n_dead / k_aux, 1) (`auxk_dead_scaling: true`, as the SPEC,
SAELens and sparsify do); it made no measurable difference there, where n_dead exceeded k_aux.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.errors import ConfigError, check_bool, check_positive
from saelab.kernels import native
from saelab.kernels.dispatch import host_sync_free
from saelab.kernels.reconstruction import SparseReconstructionError
from saelab.kernels.sparse_products import SparseDecode, SparseGather, SparsePattern, csr_offsets
from saelab.saes.base import SAE, SAEConfig, TrainStep, squared_error


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


@dataclass
class ActiveLatents:
    """A batch's active latents as a sparse [batch, d_sae] matrix of entries (rows, latents, values).

    Entries are grouped by token (rows sorted), which is what `embedding_bag`'s offsets need.
    """

    rows: Tensor
    latents: Tensor
    values: Tensor
    batch_size: int
    d_sae: int

    def dense(self) -> Tensor:
        return self.values.new_zeros(self.batch_size, self.d_sae).index_put_((self.rows, self.latents),
                                                                              self.values)

    def fired(self) -> Tensor:
        """[d_sae] bool: latents with a positive value on some token (no dense tensor is built)."""
        positive = self.values.detach().clamp_min(0).float()
        return positive.new_zeros(self.d_sae).index_add_(0, self.latents, positive) > 0

    def active_count(self) -> Tensor:
        return (self.values > 0).sum()

    def detach(self) -> ActiveLatents:
        return dataclasses.replace(self, values=self.values.detach())

    def decode(self, W_dec: Tensor) -> Tensor:
        """sum_j values_j W_dec[latents_j] per token, reading (and back-propagating to) only the used rows."""
        return F.embedding_bag(self.latents, W_dec, csr_offsets(self.rows, self.batch_size)[:-1], mode="sum",
                               per_sample_weights=self.values.to(W_dec.dtype))


@dataclass
class Selection:
    """A training batch's selection: the input, the active latents (values carry their gradient) and what AuxK
    reuses. Fused path: `pattern` is set, `pre` (if not None) is x W_enc without autograd and `pre_bias` the bias
    still to add to it, `bias` the folded encoder bias. Autograd path: `pre` is the dense pre-activations."""

    x: Tensor
    active: ActiveLatents
    pre: Tensor | None
    pattern: SparsePattern | None = None
    bias: Tensor | None = None
    pre_bias: Tensor | None = None


@dataclass
class Residual:
    """sg(t - x_hat) of one reconstruction, and the latent ids [start, stop) whose dead ones AuxK fits to it:
    given as `values`, or as sg(x_hat) in `prediction`, subtracted only if AuxK needs it (a pass saved)."""

    start: int
    stop: int
    values: Tensor | None = None
    prediction: Tensor | None = None

    def of(self, t: Tensor) -> Tensor:
        return self.values if self.values is not None else (t - self.prediction).detach()


@torch.no_grad()
def input_variance(x: Tensor) -> Tensor:
    """E_b ||x - mean_b(x)||^2: the batch's variance about its mean, summed over dimensions (a constant)."""
    return (x - x.mean(0)).pow(2).sum(-1).mean()


CANDIDATE_GROUP = 8  # per_token_topk's prefilter: groups of 8 latents (a speed knob; exact either way)
# The most entries one torch.topk call sees. PyTorch's CUDA topk runs its multi-block kernel only with 32-bit index
# math; above that one block scans the whole input (~1 s at 16,384 x 262,144), so larger inputs go in pieces.
TOPK_MAX_ELEMENTS = 2**31 - 1


@torch.no_grad()
def chunked_topk(scores: Tensor, k: int) -> Tensor:
    """Indices (unordered) of the k largest entries of the 1-D scores, with no topk call over more than
    TOPK_MAX_ELEMENTS entries: each chunk's top k, then the top k of those candidates (again in chunks while they
    are too many; a full chunk halves at least). Exact: an entry outside its chunk's top k has k entries at
    least as large, so it cannot beat the k-th largest overall (only tie it). A k above half the limit (chunks
    would barely shrink) takes one topk; B k is far below that at any real shape."""
    limit, n = TOPK_MAX_ELEMENTS, scores.numel()
    if n <= limit or k > limit // 2:
        return scores.topk(k, sorted=False).indices
    ids = torch.cat([scores[start:start + limit].topk(min(k, n - start), sorted=False).indices + start
                     for start in range(0, n, limit)])
    return ids[chunked_topk(scores[ids], k)]


def per_token_topk(scores: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """per_token_topk_rows over blocks of rows of at most TOPK_MAX_ELEMENTS entries each (rows are independent, so
    the result is the same; see chunked_topk for why)."""
    batch, width = scores.shape
    block = max(1, TOPK_MAX_ELEMENTS // max(width, 1))
    if batch <= block:
        return per_token_topk_rows(scores, k, bias)
    parts = [per_token_topk_rows(scores[start:start + block], k, bias) for start in range(0, batch, block)]
    rows = torch.cat([part[0] + start for part, start in zip(parts, range(0, batch, block), strict=True)])
    return rows, torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])


def per_token_topk_rows(scores: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, latent ids, scores) of each token's k largest scores (+ bias [d_sae], if given), grouped by token.

    On CPU in float32 this is native.row_topk (sparse_kernels.cpp, several times faster than the fallback).
    torch.topk over every [d_sae] row costs about half the encoder matmul on CPU, so the fallback narrows the
    search first: split each row into d_sae / 8 groups of 8 (columns g, g + d_sae/8, ...; a max over the middle
    dimension vectorises), keep the k groups with the largest maxima, and take the top k of those 8k
    candidates. Exact: a group outside those k has a max no larger than the k-th group max, and the k kept
    groups hold k entries at least that large, so no entry outside them can beat the k-th largest (only tie it).
    """
    batch, width = scores.shape
    group = CANDIDATE_GROUP
    found = native.row_topk(scores, k, bias)
    if found is None and bias is not None:
        scores = scores + bias
    if found is not None:
        ids, values = found
        if scores.requires_grad:  # the kernel's values carry no gradient
            values = scores.gather(1, ids)
    elif width % group == 0 and width // group >= 2 * k:
        n_groups = width // group
        group_max = scores.reshape(batch, group, n_groups).amax(1)
        groups = group_max.topk(k, dim=-1, sorted=False).indices
        columns = (groups.unsqueeze(-1) + n_groups * torch.arange(group, device=scores.device)).flatten(1)
        top = scores.gather(1, columns).topk(k, dim=-1, sorted=False)
        ids, values = columns.gather(1, top.indices), top.values
    else:
        values, ids = scores.topk(k, dim=-1, sorted=False)
    rows = torch.arange(batch, device=scores.device).repeat_interleave(k)
    return rows, ids.flatten(), values.flatten()


class TopKSAE(SAE):
    Config = TopKConfig
    saelens_architecture = "topk"
    recipe_adam_betas = (0.9, 0.999)

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.init_decoder_and_tied_encoder())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.k = int(round(cfg.target_l0)) if cfg.target_l0 is not None else int(cfg.k)
        self.k_aux = int(cfg.k_aux) if cfg.k_aux is not None else max(1, self.d_in // 2)

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
        """Each token's k largest of pre (+ bias, if given: the native kernel adds it as it scans).
        TopK then ReLU == TopK of ReLU (ReLU is monotone), a pass less."""
        rows, latents, values = per_token_topk(pre, self.k, bias)
        return ActiveLatents(rows, latents, values.relu(), pre.shape[0], pre.shape[1])

    def screened_select(self, x: Tensor, bias: Tensor) -> ActiveLatents | None:
        """The training selection of x W_enc + bias found through a bfloat16 screen (native.Screen), or None where
        it does not apply (sae.bf16_screen false, not CPU float32, or a CPU without bf16 dot products).

        On such CPUs a bf16 matmul runs ~2.6x faster than the float32 one, and its output is within a proven
        bound of the float32 pre-activations; the kernel computes exact float32 values only for the entries
        whose bound reaches the selection's threshold (1.4-2.5 k per token here) and selects among them, so the latents
        are the float32 top-k (tests/test_native_kernels.py checks equality).
        """
        self.screen_candidates_per_token = None  # this step's, for diagnostics (benchmarks/train_step.py)
        if not self.screen_applies(x, bias):
            return None
        screen = native.bf16_screen(x, self.W_enc, bias, out=self.workspace("screen", x, torch.bfloat16))
        selected = self.select_screened(screen) if screen is not None else None
        if selected is None:
            return None
        active, candidates = selected
        self.screen_candidates_per_token = candidates / x.shape[0]
        return active

    def screen_applies(self, x: Tensor, bias: Tensor) -> bool:
        """Whether to try the bf16 screen: asked before its [B, d_sae] bf16 buffer exists, so a GPU step (or any
        tensor the CPU kernels cannot take) never allocates one. The CPU's flags are checked last."""
        float32 = x.dtype == self.W_enc.dtype == bias.dtype == torch.float32
        return self.cfg.bf16_screen and float32 and native.usable(x, self.W_enc, bias) and native.fast_bf16()

    def select_screened(self, screen: native.Screen) -> tuple[ActiveLatents, int] | None:
        """(the selection, how many exact values the kernel computed), or None if the kernel declined."""
        found = native.screened_row_topk(screen, self.k)
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
        selected entries get a gradient (fused.SparseGather), and the reconstruction decodes them sparsely
        (fused.SparseReconstructionError), so no dense [B, d_sae] gradient or dense dW_enc matmul is ever built.
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

    def auxk_terms(self, selection: Selection, dead: Tensor, residuals: list[Residual], t: Tensor) -> Tensor:
        """The AuxK loss (before alpha), summed over the residuals: each one's dead latents (those in its range of
        latent ids) reconstruct it. Zero while nothing in range is dead."""
        total = t.new_zeros(())
        variance = None
        if host_sync_free(t):  # the same loss with fixed shapes: no count of the dead latents reaches the host
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

    def float32_preacts(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor | None]:
        """(pi, the bias still to add to it, or None): x W_enc into a reused buffer. The native top-k adds the bias
        as it scans, sparing addmm a pass that writes it into pi; elsewhere addmm adds it."""
        if native.usable(x, bias):
            return torch.mm(x, self.W_enc, out=self.workspace("pre", x)), bias
        return torch.addmm(bias, x, self.W_enc, out=self.workspace("pre", x)), None

    @torch.no_grad()
    def dead_preacts(self, x: Tensor, dead_ids: Tensor, pre: Tensor | None, pre_bias: Tensor | None,
                     bias: Tensor) -> tuple[Tensor, Tensor | None]:
        """The dead latents' pre-activations for AuxK and the bias still to add to them (or None): taken from pi,
        or, after the bf16 screen (pre None), an exact float32 matmul over the dead latents' columns alone."""
        if pre is None:
            return torch.mm(x, self.W_enc[:, dead_ids]), bias[dead_ids]
        return pre[:, dead_ids], (pre_bias[dead_ids] if pre_bias is not None else None)

    def attach_gradient(self, active: ActiveLatents, x: Tensor, relu: bool = True) -> SparsePattern:
        """Give the selected entries, whose values were taken from pi = x W_enc + folded bias without autograd,
        their sparse gradient (to W_enc, b_enc and b_dec); returns their SparsePattern for the decoder.

        active.values become the values with a gradient, after a ReLU if `relu`. The selection's values may
        already be ReLU'd: ReLU(ReLU(p)) = ReLU(p), and its backward masks the same entries (where p <= 0).
        """
        pattern = SparsePattern(active.rows, active.latents, active.batch_size, active.d_sae)
        b_dec = self.b_dec if self.centres_input else None
        values = SparseGather.apply(x, self.W_enc, self.b_enc, b_dec, active.values, pattern)
        active.values = values.relu() if relu else values
        return pattern

    def update_from_batch(self, active: ActiveLatents) -> dict[str, Tensor]:
        """Per-batch state updates from the training selection (none for TopK); returns extras to log."""
        return {}

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

    def export_tensors(self, scale: float) -> dict[str, Tensor]:
        return self.standard_tensors(scale)

    def export_config(self) -> dict[str, Any]:
        return {**super().export_config(), "k": self.k}
