"""Ground-truth metrics for a source that knows its features (data=synthetic): how well an SAE's dictionary and
firing recover the true ones.

- `mcc`: the mean |cosine| of an optimal one-to-one matching between decoder rows and true features (Hungarian
  algorithm on |cos|; signs do not matter). A random dictionary scores its chance level, the truth 1.
- `recovered_fraction`: true features whose matched latent has |cos| > 0.9.
- `uniqueness`: distinct true features among the nearest features of the latents that fire on held-out data,
  divided by the number of those latents (1: no two latents describe the same feature).
- `firing_precision`, `firing_recall`, `firing_f1`: for matched pairs with |cos| > 0.5 whose feature fires on the
  held-out set, P(feature fires | latent fires), P(latent fires | feature fires), and their F1, averaged.
- `absorption_rate`: over parents with a matched latent, P(the parent's latent is silent | the parent and one of
  its children fire), averaged: a parent latent absorbed into its children stops firing exactly there.

Beside them, SynthSAEBench's conventions (arXiv 2602.14687; SAELens's `sae_lens.synthetic` evals), named apart
because they answer other questions: every latent, dead or alive, is paired with its nearest true feature by
|cos| (no one-to-one matching, no threshold):

- `synthsaebench_precision`, `synthsaebench_recall`, `synthsaebench_f1`: the latent's firing as a detector of
  its nearest feature's, each 0 where undefined (so a dead latent scores 0), averaged over all M latents;
- `synthsaebench_uniqueness`: distinct nearest features among all M latents, divided by M.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

MATCHED = 0.5  # |cos| above which a matched latent counts as describing its feature (firing, absorption)
RECOVERED = 0.9


def match(decoder: Tensor, truth: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(latent ids, feature ids, their |cos|) of the optimal one-to-one matching of decoder rows [M, d] to true
    features [N, d] (min(M, N) pairs), and the whole [M, N] |cos| matrix."""
    rows = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (rows.double() @ truth.double().T).abs()
    latent, feature = linear_sum_assignment(cos.numpy(), maximize=True)
    latent, feature = torch.from_numpy(latent), torch.from_numpy(feature)
    return latent, feature, cos[latent, feature].float(), cos


@torch.no_grad()
def ground_truth_metrics(decoder: Tensor, latents_fired: Tensor, truth: Tensor, truth_fired: Tensor,
                         parent: Tensor) -> dict[str, float]:
    """`decoder` [M, d]; `latents_fired` [n, M] and `truth_fired` [n, N] bool on the same held-out samples;
    `parent` [N] (-1 for features without a parent)."""
    latent, feature, cos, all_cos = match(decoder.detach().float().cpu(), truth.float().cpu())
    latents_fired, truth_fired = latents_fired.cpu(), truth_fired.cpu()
    metrics = {"mcc": float(cos.mean()), "recovered_fraction": float((cos > RECOVERED).float().mean())}

    alive = latents_fired.any(0)
    nearest = all_cos.argmax(1)  # each latent's closest true feature
    metrics["uniqueness"] = float(nearest[alive].unique().numel() / max(int(alive.sum()), 1))

    good = (cos > MATCHED) & truth_fired[:, feature].any(0)
    if good.any():
        lat, feat = latent[good], feature[good]
        both = (latents_fired[:, lat] & truth_fired[:, feat]).sum(0).float()
        precision = both / latents_fired[:, lat].sum(0).clamp_min(1)
        recall = both / truth_fired[:, feat].sum(0).clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        metrics |= {"firing_precision": float(precision.mean()), "firing_recall": float(recall.mean()),
                    "firing_f1": float(f1.mean())}

    metrics |= synthsaebench_metrics(all_cos, latents_fired, truth_fired)

    latent_of = torch.full((truth.shape[0],), -1, dtype=torch.long)
    latent_of[feature[cos > MATCHED]] = latent[cos > MATCHED]
    rates = []
    for p in torch.unique(parent[parent >= 0]).tolist():
        children = (parent == p).nonzero().squeeze(1)
        if latent_of[p] < 0:
            continue
        with_child = truth_fired[:, p] & truth_fired[:, children].any(1)
        if with_child.any():
            rates.append(float((~latents_fired[with_child, latent_of[p]]).float().mean()))
    if rates:
        metrics["absorption_rate"] = sum(rates) / len(rates)
    return metrics


def synthsaebench_metrics(all_cos: Tensor, latents_fired: Tensor, truth_fired: Tensor) -> dict[str, float]:
    """SynthSAEBench's detection metrics and uniqueness (module docstring) from the [M, N] |cos| matrix and the
    held-out firing of the latents [n, M] and of the true features [n, N]."""
    nearest = all_cos.argmax(1)
    fired, truth = latents_fired, truth_fired[:, nearest]  # [n, M]: each latent beside its nearest feature
    tp = (fired & truth).sum(0).double()
    precision = tp / fired.sum(0).double().clamp_min(1)  # 0 when the latent never fires
    recall = tp / truth.sum(0).double().clamp_min(1)  # 0 when its feature never fires
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    return {"synthsaebench_precision": float(precision.mean()), "synthsaebench_recall": float(recall.mean()),
            "synthsaebench_f1": float(f1.mean()),
            "synthsaebench_uniqueness": float(nearest.unique().numel() / max(len(nearest), 1))}
