"""Metrics of an SAE that reads and writes several sites (a crosscoder), per site and for model diffing.

Everything is measured in raw units (each site's normalised activations and decoder columns times the site's
normalisation scale), so sites with different scales compare. A and B are the two sides of the diff
(`diff_sides`): a two-model crosscoder's sites in the first model and in the second (model.diff_with: diff/<hook>),
paired in order, e.g. [blocks.2, blocks.3] against [diff/blocks.2, diff/blocks.3]; otherwise the first site
against the last. A side's decoder is its sites' decoders concatenated.

- `site_fvu`, `site_l0`, `site_dead_fraction` ({site: value}): FVU of each site's reconstruction; active latents
  per token that write to the site (decoder norm there at least a tenth of the latent's largest); of the latents
  that write to the site, those that never fired on the held-out tokens.
- `relative_norm_histogram`: counts in 20 equal bins over [0, 1] of the latents that fired, by Minder et al.'s
  (2025) relative decoder norm Delta_j = ((||d_j^B|| - ||d_j^A||) / max(||d_j^A||, ||d_j^B||) + 1) / 2: 0 is A only,
  1 is B only, 0.5 equal; `exclusive_b_latents`: latents that fired with Delta_j > 0.9 (their "B-only" band).
- Latent Scaling (Minder et al. 2025, section 3): for latent j with B decoder d = d_j^B and latents f_j(x),
  beta_j^s = argmin_beta sum_x ||beta f_j(x) d - y^s(x)||^2 with y^s = the site's error with the latent's own
  contribution added back (x^s - x_hat^s + f_j d_j^s), i.e. sum_x f_j <d, y^s> / (sum_x f_j^2 ||d||^2), over a
  side's sites concatenated (A's k-th site against B's k-th decoder block); nu_j = beta_j^A / beta_j^B is near
  0 for a truly B-only latent and near A's strength for one that A also carries. `latent_scaling_median` is the
  median nu over the B-only latents.

With the ground truth of a multi-site world (data/synthetic_sites.py):
- `site_mcc` ({site: mcc}): the one-to-one recovery of the features present at each site from that site's
  decoder columns;
- `exclusive_precision` / `exclusive_recall`: each B-only latent is read as its nearest true feature at site B
  (|cos| > 0.5); precision is the share of those whose feature is truly exclusive to B, recall the share of
  B-exclusive features that some B-only latent reads as;
- `latent_scaling_auroc`: how well nu separates the false exclusives (higher nu) from the true ones (0.5:
  chance, 1: perfectly), over the B-only latents that read as a feature.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from saelab.data.model import is_diff_site
from saelab.data.synthetic_sites import EXCLUSIVE
from saelab.metrics.ground_truth import MATCHED, match
from saelab.sites import column_scales

B_ONLY = 0.9  # Delta above which a latent is "B only" (Minder et al.'s chat-only band, [0.9, 1])
WRITES = 0.1  # a latent writes to a site where its decoder norm is at least this fraction of its largest
BINS = 20


def diff_sides(sites: list[str]) -> tuple[list[int], list[int]]:
    """(A's site indices, B's): the first model's sites and the second's (diff/<hook>) when both have as many,
    paired in order; otherwise the first site and the last."""
    a = [i for i, site in enumerate(sites) if not is_diff_site(site)]
    b = [i for i, site in enumerate(sites) if is_diff_site(site)]
    return (a, b) if a and len(a) == len(b) else ([0], [len(sites) - 1])


def relative_norm(site_norms: Tensor, a: list[int] | None = None, b: list[int] | None = None) -> Tensor:
    """Minder et al.'s Delta_j of [d_sae, S] decoder norms, between side A's concatenated decoders and side B's
    (default: the first site and the last)."""
    norm_a = site_norms[:, a if a is not None else [0]].norm(dim=1)
    norm_b = site_norms[:, b if b is not None else [-1]].norm(dim=1)
    return 0.5 * ((norm_b - norm_a) / torch.maximum(norm_a, norm_b).clamp_min(1e-12) + 1)


class SiteMetrics:
    """The metrics above, accumulated over the batches of the held-out pass that measures the rest (evaluate_sae's
    `observe`): the target x [B, S d] (normalised, sites side by side), the SAE's output and its latents."""

    def __init__(self, W_dec: Tensor, sites: list[str], scales: list[float], diffing: bool = True):
        """`W_dec` [d_sae, S d] in normalised units; `scales`: each site's normalisation scale; `diffing` false
        (a cross-layer transcoder's output layers): the per-site metrics alone, none comparing sites A and B."""
        self.sites, n_sites, self.diffing = sites, len(sites), diffing
        self.col_scale = column_scales(scales, W_dec.shape[1] // n_sites).to(W_dec.device)
        self.W = (W_dec.detach().float() * self.col_scale).view(W_dec.shape[0], n_sites, -1)  # raw, [d_sae, S, d]
        self.norms = self.W.norm(dim=-1)  # [d_sae, S]
        self.writes = self.norms >= WRITES * self.norms.max(dim=1, keepdim=True).values.clamp_min(1e-12)
        self.a, self.b = diff_sides(sites)
        # Latent Scaling fits each site's error with the block of B's decoder that site pairs with
        self.ref = [self.b[self.a.index(s)] if s in self.a else self.b[self.b.index(s)] if s in self.b else self.b[0]
                    for s in range(n_sites)]
        self.d_ref = {r: self.W[:, r].double() for r in set(self.ref)}  # [d_sae, d] each
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=W_dec.device)
        self.sse, self.sq, self.active = zeros(n_sites), zeros(n_sites), zeros(n_sites)
        self.colsum, self.f_sq = zeros(W_dec.shape[1]), zeros(W_dec.shape[0])
        self.fit = zeros(n_sites, W_dec.shape[0])  # sum_x f_j <d_j^B, error^s>
        self.fired = torch.zeros(W_dec.shape[0], dtype=torch.bool, device=W_dec.device)
        self.n = 0

    def __call__(self, x: Tensor, output: Tensor, f: Tensor) -> None:
        n_sites = len(self.sites)
        x_raw, err = (x * self.col_scale).double(), ((x - output) * self.col_scale).double()
        f64 = f.double()
        self.fired |= (f > 0).any(0)
        self.active += (f > 0).double().sum(0) @ self.writes.double()
        self.f_sq += f64.pow(2).sum(0)
        self.colsum += x_raw.sum(0)
        self.sq += x_raw.pow(2).view(len(x), n_sites, -1).sum((0, 2))
        self.sse += err.pow(2).view(len(x), n_sites, -1).sum((0, 2))
        for s, es in enumerate(err.chunk(n_sites, 1)):
            self.fit[s] += ((f64.t() @ es) * self.d_ref[self.ref[s]]).sum(1)
        self.n += len(x)

    def compute(self, truth=None) -> dict:
        """The metrics; with `truth` (a MultiSiteWorld) those against the ground truth too."""
        sites, n = self.sites, float(self.n)
        variance = self.sq - self.colsum.pow(2).view(len(sites), -1).sum(1) / n  # about each dimension's mean
        own = torch.stack([(self.W[:, s].double() * self.d_ref[r]).sum(-1) for s, r in enumerate(self.ref)])
        # beta^G = sum_{s in G} (fit_s + f^2 <d^B, d^s>) / (sum_x f^2 ||d^B||^2); the denominator cancels in nu
        side_fit = lambda side: (self.fit[side] + self.f_sq * own[side]).sum(0)  # noqa: E731  [d_sae]
        nu = (side_fit(self.a) / side_fit(self.b).clamp_min(1e-12)).float()
        delta = relative_norm(self.norms, self.a, self.b)
        b_only = self.fired & (delta > B_ONLY)
        metrics = {
            "site_fvu": {name: float(self.sse[s] / variance[s].clamp_min(1e-30)) for s, name in enumerate(sites)},
            "site_l0": {name: float(self.active[s]) / n for s, name in enumerate(sites)},
            "site_dead_fraction": {name: float((self.writes[:, s] & ~self.fired).sum())
                                   / max(int(self.writes[:, s].sum()), 1) for s, name in enumerate(sites)},
        }
        if not self.diffing:
            return metrics
        metrics |= {
            "relative_norm_histogram": torch.histc(delta[self.fired].cpu(), BINS, 0.0, 1.0).int().tolist(),
            "exclusive_b_latents": int(b_only.sum()),
            "latent_scaling_median": float(nu[b_only].median()) if b_only.any() else float("nan"),
        }
        if truth is not None:
            metrics |= _truth_metrics(self.W.cpu(), b_only.cpu(), nu.cpu(), truth, sites)
        return metrics


def _truth_metrics(W: Tensor, b_only: Tensor, nu: Tensor, truth, sites: list[str]) -> dict:
    """site_mcc, exclusive precision and recall, and Latent Scaling's AUROC against a MultiSiteWorld."""
    metrics: dict = {"site_mcc": {}}
    for s, name in enumerate(sites):
        present = truth.strength[:, s] > 0
        _, _, cos, _ = match(W[:, s], truth.site_dictionary[s][present])
        metrics["site_mcc"][name] = float(cos.mean())
    last = len(sites) - 1
    at_b = truth.strength[:, last] > 0
    rows = W[:, last] / W[:, last].norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (rows.double() @ truth.site_dictionary[last].double().T).abs()
    cos[:, ~at_b] = 0  # a latent at B reads as a feature B carries
    best, feature = cos.max(dim=1)
    reads = b_only & (best > MATCHED)
    exclusive_b = (truth.kind == EXCLUSIVE) & (truth.site == last)
    true_excl = reads & exclusive_b[feature]
    metrics["exclusive_precision"] = float(true_excl.sum() / reads.sum()) if reads.any() else float("nan")
    found = torch.zeros_like(exclusive_b)
    found[feature[true_excl]] = True
    metrics["exclusive_recall"] = float(found.sum() / exclusive_b.sum()) if exclusive_b.any() else float("nan")
    false_excl = reads & ~exclusive_b[feature]
    metrics["latent_scaling_auroc"] = auroc(nu[false_excl], nu[true_excl])
    return metrics


def auroc(positive: Tensor, negative: Tensor) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney); nan without both kinds."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    diff = positive.double().unsqueeze(1) - negative.double().unsqueeze(0)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
