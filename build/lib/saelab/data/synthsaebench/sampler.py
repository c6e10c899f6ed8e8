"""Sampling a SynthSAEBench world's feature activations a [n, N] (the order SAELens's ActivationGenerator and
hierarchy modifier apply things in):

1. firing: with a copula, z = F u + sqrt(diag) eta and feature i fires where z_i > Phi^-1(1 - q_i) (copula.py);
   without one, independently with probability q_i (q: the compensated sampling probabilities);
2. magnitudes: a firing feature's raw activation is relu(mean_i + std_i g), g ~ N(0, 1);
3. hierarchy (hierarchy.py), level by level from the roots: gate each level's features by their parent's
   activation (scaling by a_parent / mean_parent where the parent's node says so), then apply the mutual exclusion
   of the groups whose node is at that level (a uniformly random active sibling survives).

A feature fires in a sample when its final activation is > 0. The activations are x = a D + bias (no noise),
summed over the firing features only (world.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.data.synthsaebench.copula import Copula, thresholds
from saelab.data.synthsaebench.hierarchy import Hierarchy


@dataclass(frozen=True)
class _Level:
    features: Tensor | slice  # features of this level with a parent (a slice when they are a contiguous range)
    parents: Tensor
    rescale: Tensor  # [len(features)] bool
    groups: Tensor  # [G_L, B] exclusive sibling groups whose node is at this level
    group_parent: Tensor  # [G_L] (-1: always active)


class ActivationSampler:
    """Draws feature activations from a world's sampling probabilities, magnitudes, copula and hierarchy."""

    def __init__(self, probability: Tensor, mean: Tensor, std: Tensor, copula: Copula | None,
                 hierarchy: Hierarchy | None):
        self.probability, self.mean, self.std, self.copula = probability, mean, std, copula
        self.n_features = len(probability)
        self.threshold = thresholds(probability) if copula is not None else None
        self.diag_sqrt = copula.diag.sqrt() if copula is not None else None
        self.levels: list[_Level] = []
        if hierarchy is not None:
            for level in range(hierarchy.n_levels):
                here = (hierarchy.level == level) & (hierarchy.parent >= 0)
                features = here.nonzero().squeeze(1)
                in_level = hierarchy.group_level == level
                first = int(features[0]) if len(features) else 0
                span = len(features) > 0 and bool((features == torch.arange(first, first + len(features))).all())
                self.levels.append(_Level(slice(first, first + len(features)) if span else features,
                                          hierarchy.parent[features], hierarchy.rescale[features],
                                          hierarchy.groups[in_level], hierarchy.group_parent[in_level]))

    def firing(self, n: int, generator: torch.Generator) -> Tensor:
        """[N, n] bool (feature-major): step 1, before magnitudes and hierarchy."""
        if self.copula is None:
            return torch.rand(self.n_features, n, generator=generator) < self.probability.unsqueeze(1)
        u = torch.randn(self.copula.factor.shape[1], n, generator=generator)
        z = torch.randn(self.n_features, n, generator=generator).mul_(self.diag_sqrt.unsqueeze(1))
        return z.addmm_(self.copula.factor, u) > self.threshold.unsqueeze(1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """[N, n] float32 activations (module docstring), feature-major (a level's features and their parents are
        whole rows), drawn with `generator`. Magnitudes are drawn densely (the compensated probabilities make a
        large share of features fire before the hierarchy gates them) and kept where features fire."""
        fired = self.firing(n, generator)
        magnitude = torch.randn(self.n_features, n, generator=generator).mul_(self.std.unsqueeze(1))
        acts = magnitude.add_(self.mean.unsqueeze(1)).relu_().mul_(fired)
        for level in self.levels:
            if len(level.parents):
                parent = acts[level.parents]  # [F, n]
                scale = torch.where(level.rescale.unsqueeze(1), parent / self.mean[level.parents].unsqueeze(1), 1.0)
                acts[level.features] *= torch.where(parent > 0, scale, 0.0)
            if len(level.groups):
                self._exclude(acts, level, generator)
        return acts

    @staticmethod
    def _exclude(acts: Tensor, level: _Level, generator: torch.Generator) -> None:
        """Mutual exclusion, in place on feature-major `acts` [N, n]: in every group with an active node and
        several active members, all but one member chosen uniformly at random are set to 0."""
        members = level.groups  # [G, B]
        active = (acts[members.clamp(min=0)] > 0) & (members >= 0).unsqueeze(2)  # [G, B, n]
        node_active = (acts[level.group_parent.clamp(min=0)] > 0) | (level.group_parent < 0).unsqueeze(1)  # [G, n]
        active &= node_active.unsqueeze(1)
        groups, rows = (active.sum(1) > 1).nonzero(as_tuple=True)
        if not len(rows):
            return
        contenders = active[groups, :, rows]  # [k, B]
        score = torch.rand(contenders.shape, generator=generator).masked_fill(~contenders, -1.0)
        losers = contenders.clone()
        losers[torch.arange(len(rows)), score.argmax(1)] = False
        k, slot = losers.nonzero(as_tuple=True)
        acts[members[groups[k], slot], rows[k]] = 0.0
