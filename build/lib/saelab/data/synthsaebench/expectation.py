"""Each feature's marginal firing probability, and so the expected L0, from a world's spec, with the copula's
correlations set aside (features' raw firing independent):

- raw: feature i has a raw activation > 0 with probability r_i = q_i P(mean_i + std_i g > 0) = q_i Phi(mean_i / std_i)
  (q: the compensated sampling probabilities; the relu can zero a raw draw);
- exclusion: a raw-active member of an exclusive group survives, given its node is active, with probability
  E[1 / (1 + K_i)], K_i the number of its other raw-active siblings (independent Bernoulli(r_j): a Poisson-binomial
  law, computed exactly), since the survivor is uniform among the K_i + 1 active members; 1 outside a group;
- gating: a feature fires only if its parent does, and its own raw draw and survival are independent of that, so

      P_i = P_parent(i) * r_i * E[1 / (1 + K_i)],    P_parent = 1 for a feature without a parent

and E[L0] = sum_i P_i (over features 0..k-1: the L0 of those features). The copula changes the joint law of raw
firing, so sampled marginals differ from P_i by second-order terms in the factor correlations (~ corr^2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.data.synthsaebench.hierarchy import Hierarchy


def raw_probability(q: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """r_i = q_i Phi(mean_i / std_i) (float64; std 0: 1 where mean > 0)."""
    mean, std = mean.double(), std.double()
    positive = torch.where(std > 0, torch.special.ndtr(mean / std.clamp_min(1e-300)), (mean > 0).double())
    return q.double() * positive


def survival(r: Tensor, groups: Tensor) -> Tensor:
    """[N] E[1 / (1 + K_i)] for members of the groups [G, B] (padding -1), 1 elsewhere."""
    out = torch.ones_like(r)
    if not len(groups):
        return out
    valid = groups >= 0
    p = torch.where(valid, r[groups.clamp(min=0)], torch.zeros((), dtype=r.dtype))  # [G, B]
    width = p.shape[1]
    others = p.unsqueeze(1).expand(-1, width, -1).clone()  # [G, B (member), B (sibling)]
    others[:, torch.arange(width), torch.arange(width)] = 0.0
    law = torch.zeros(*others.shape[:2], width + 1, dtype=r.dtype)  # P(K = k), k = 0..B
    law[..., 0] = 1.0
    for j in range(width):
        pj = others[..., j : j + 1]
        law = law * (1 - pj) + torch.nn.functional.pad(law[..., :-1], (1, 0)) * pj
    expected = (law / torch.arange(1, width + 2, dtype=r.dtype)).sum(-1)  # [G, B]
    out[groups[valid]] = expected[valid]
    return out


def marginal_probability(q: Tensor, mean: Tensor, std: Tensor, hierarchy: Hierarchy | None) -> Tensor:
    """[N] float64 P_i of the module docstring."""
    r = raw_probability(q, mean, std)
    if hierarchy is None:
        return r
    own = r * survival(r, hierarchy.groups)
    marginal = own.clone()
    for level in range(1, hierarchy.n_levels):  # parents sit at lower levels: fill top-down
        here = ((hierarchy.level == level) & (hierarchy.parent >= 0)).nonzero().squeeze(1)
        marginal[here] = own[here] * marginal[hierarchy.parent[here]]
    return marginal
