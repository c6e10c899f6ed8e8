"""Metrics of an SAE that reads and writes several sites (a crosscoder), per site and for model diffing.

Everything is measured in raw units (each site's normalised activations and decoder columns times the site's
normalisation scale), so sites with different scales compare. Site A is the first site, B the last (in model
diffing: the base model and its fine-tune).

- `site_fvu`, `site_l0`, `site_dead_fraction` ({site: value}): FVU of each site's reconstruction; active latents
  per token that write to the site (decoder norm there at least a tenth of the latent's largest); of the latents
  that write to the site, those that never fired on the held-out tokens.
- `relative_norm_histogram`: counts in 20 equal bins over [0, 1] of the latents that fired, by Minder et al.'s
  (2025) relative decoder norm Delta_j = ((||d_j^B|| - ||d_j^A||) / max(||d_j^A||, ||d_j^B||) + 1) / 2: 0 is A only,
  1 is B only, 0.5 equal; `exclusive_b_latents`: latents that fired with Delta_j > 0.9 (their "B-only" band).
- Latent Scaling (Minder et al. 2025, section 3): for latent j with B decoder d = d_j^B and latents f_j(x),
  beta_j^s = argmin_beta sum_x ||beta f_j(x) d - y^s(x)||^2 with y^s = the site's error with the latent's own
  contribution added back (x^s - x_hat^s + f_j d_j^s), i.e. sum_x f_j <d, y^s> / (sum_x f_j^2 ||d||^2);
  nu_j = beta_j^A / beta_j^B is near 0 for a truly B-only latent and near A's strength for one that A also
  carries. `latent_scaling_median` is the median nu over the B-only latents.

With the ground truth of a multi-site world (data/synthetic_sites.py):
- `site_mcc` ({site: mcc}): the one-to-one recovery of the features present at each site from that site's
  decoder columns;
- `exclusive_precision` / `exclusive_recall`: each B-only latent is read as its nearest true feature at site B
  (|cos| > 0.5); precision is the share of those whose feature is truly exclusive to B, recall the share of
  B-exclusive features that some B-only latent reads as; `false_exclusive_fraction` = 1 - precision;
- `latent_scaling_auroc`: how well nu separates the false exclusives (higher nu) from the true ones (0.5:
  chance, 1: perfectly), over the B-only latents that read as a feature.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from saelab.data.synthetic_sites import EXCLUSIVE
from saelab.metrics.ground_truth import MATCHED, match

B_ONLY = 0.9  # Delta above which a latent is "B only" (Minder et al.'s chat-only band, [0.9, 1])
WRITES = 0.1  # a latent writes to a site where its decoder norm is at least this fraction of its largest
BINS = 20


def relative_norm(site_norms: Tensor) -> Tensor:
    """Minder et al.'s Delta_j of [d_sae, S] decoder norms, between the first site (A) and the last (B)."""
    a, b = site_norms[:, 0], site_norms[:, -1]
    return 0.5 * ((b - a) / torch.maximum(a, b).clamp_min(1e-12) + 1)


@torch.no_grad()
def site_metrics(sae: nn.Module, acts: Tensor, sites: list[str], scales: list[float], batch_size: int,
                 truth=None) -> dict:
    """The metrics above for `sae` (normalised activations in and out) on held-out `acts` [n, S d] (normalised,
    sites side by side); `scales`: each site's normalisation scale; `truth`: a MultiSiteWorld or None."""
    n_sites = len(sites)
    device = next(itertools.chain(sae.parameters(), sae.buffers())).device
    col_scale = torch.tensor(scales, dtype=torch.float32).repeat_interleave(acts.shape[1] // n_sites).to(device)
    W = (sae.W_dec.detach().float() * col_scale).view(sae.d_sae, n_sites, -1)  # raw units, [d_sae, S, d]
    norms = W.norm(dim=-1)  # [d_sae, S]
    writes = norms >= WRITES * norms.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    d_b = W[:, -1]  # [d_sae, d]: each latent's B decoder direction, for Latent Scaling
    sse, sq = (torch.zeros(n_sites, dtype=torch.float64, device=device) for _ in range(2))
    colsum = torch.zeros(acts.shape[1], dtype=torch.float64, device=device)
    active = torch.zeros(n_sites, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    fit = torch.zeros(n_sites, sae.d_sae, dtype=torch.float64, device=device)  # sum_x f_j <d_j^B, error^s>
    f_sq = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    was_training = sae.training
    sae.eval()
    try:
        for start in range(0, len(acts), batch_size):
            x = acts[start:start + batch_size].to(device)
            f = sae.encode(x)
            x_raw, err = (x * col_scale).double(), ((x - sae.output(x, f)) * col_scale).double()
            fired |= (f > 0).any(0)
            active += (f > 0).double().sum(0) @ writes.double()
            f_sq += f.double().pow(2).sum(0)
            colsum += x_raw.sum(0)
            sq += x_raw.pow(2).view(len(x), n_sites, -1).sum((0, 2))
            sse += err.pow(2).view(len(x), n_sites, -1).sum((0, 2))
            for s, es in enumerate(err.chunk(n_sites, 1)):
                fit[s] += ((f.t().double() @ es) * d_b.double()).sum(1)
    finally:
        sae.train(was_training)
    n = float(len(acts))
    variance = sq - colsum.pow(2).view(n_sites, -1).sum(1) / n  # each site's, about each dimension's mean
    own = (W * d_b.unsqueeze(1)).sum(-1).t().double()  # [S, d_sae]: <d_j^B, d_j^s>
    beta = (fit + f_sq * own) / (f_sq * d_b.double().pow(2).sum(-1)).clamp_min(1e-12)
    nu = (beta[0] / beta[-1].clamp_min(1e-12)).float()
    delta = relative_norm(norms)
    b_only = fired & (delta > B_ONLY)
    metrics = {
        "site_fvu": {name: float(sse[s] / variance[s].clamp_min(1e-30)) for s, name in enumerate(sites)},
        "site_l0": {name: float(active[s]) / n for s, name in enumerate(sites)},
        "site_dead_fraction": {name: float((writes[:, s] & ~fired).sum()) / max(int(writes[:, s].sum()), 1)
                               for s, name in enumerate(sites)},
        "relative_norm_histogram": torch.histc(delta[fired].cpu(), BINS, 0.0, 1.0).int().tolist(),
        "exclusive_b_latents": int(b_only.sum()),
        "latent_scaling_median": float(nu[b_only].median()) if b_only.any() else float("nan"),
    }
    if truth is not None:
        metrics |= _truth_metrics(W.cpu(), b_only.cpu(), nu.cpu(), truth, sites)
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
    metrics["false_exclusive_fraction"] = 1 - metrics["exclusive_precision"]
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
