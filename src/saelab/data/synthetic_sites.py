"""A synthetic world that writes several sites (`data.synthetic.sites` > 1): ground truth for crosscoders.

The features fire as in SyntheticWorld (data/synthetic.py: the same firing, hierarchies and magnitudes); each
feature i has a direction d_i^s and a strength a_i^s at every site s, and site s's activation is

    x^s = sum_i c_i a_i^s d_i^s + noise,    c_i = (firing x magnitude)_i.

A feature's presence pattern is one of (in the proportions the spec sets, features assigned at random):
- shared: strength 1 at every site;
- exclusive: strength 1 at one site, 0 at the others (Minder et al. 2025's "fine-tune only" concept at site B);
- ratio: strength `weak_strength` at one site, 1 at the others (a concept a fine-tune amplified).
Exclusive and ratio features are spread evenly over the sites. Directions: d_i^s = normalise(sqrt(r) d_i +
sqrt(1 - r) e_i^s) with r = `site_direction_overlap` (1: one direction at every site, like a base model and its
fine-tune; 0: independent directions, like different layers).

A crosscoder reads the sites side by side, so the joint truth is each feature's concatenated row
(a_i^1 d_i^1, ..., a_i^S d_i^S), normalised: `dictionary` [N, S d]; `strength` [N, S] and `kind` [N] say the
pattern, which the site metrics (metrics/sites.py) score against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelab.data.synthetic import SyntheticSpec, SyntheticWorld

SHARED, EXCLUSIVE, RATIO = 0, 1, 2


def site_names(sites: int) -> list[str]:
    """The pseudo-hooks of a world's sites: "synthetic" for one site, site_0 .. site_{S-1} for several."""
    return ["synthetic"] if sites == 1 else [f"site_{s}" for s in range(sites)]


class MultiSiteWorld(SyntheticWorld):
    """SyntheticWorld whose samples are [n, S d]: its S sites side by side."""

    def __init__(self, spec: SyntheticSpec):
        super().__init__(spec)
        n, d, sites = spec.n_features, spec.d_in, spec.sites
        g = torch.Generator().manual_seed(spec.world_seed + 7)
        order = torch.randperm(n, generator=g)
        n_excl, n_ratio = round(spec.exclusive_fraction * n), round(spec.ratio_fraction * n)
        self.kind = torch.full((n,), SHARED, dtype=torch.long)
        self.kind[order[:n_excl]] = EXCLUSIVE
        self.kind[order[n_excl:n_excl + n_ratio]] = RATIO
        self.site = torch.full((n,), -1, dtype=torch.long)  # the exclusive site, or the ratio feature's weak site
        for ids in (order[:n_excl], order[n_excl:n_excl + n_ratio]):
            self.site[ids] = torch.arange(len(ids)) % sites
        self.strength = torch.ones(n, sites)
        excl, ratio = self.kind == EXCLUSIVE, self.kind == RATIO
        self.strength[excl] = 0.0
        self.strength[excl, self.site[excl]] = 1.0
        self.strength[ratio, self.site[ratio]] = spec.weak_strength
        r = spec.site_direction_overlap
        own = torch.randn(sites, n, d, generator=g)
        own = own / own.norm(dim=-1, keepdim=True)
        mixed = math.sqrt(r) * self.dictionary + math.sqrt(1 - r) * own  # [S, N, d]
        self.site_dictionary = (mixed / mixed.norm(dim=-1, keepdim=True) if r < 1
                                else self.dictionary.expand(sites, n, d).clone())  # r = 1: exactly one direction
        joint = (self.strength.T.unsqueeze(-1) * self.site_dictionary).transpose(0, 1).reshape(n, sites * d)
        self.dictionary = joint / joint.norm(dim=1, keepdim=True)  # [N, S d]: what a crosscoder's rows recover
        self.site_names = site_names(sites)

    def mix(self, coefficients: Tensor, generator: torch.Generator) -> Tensor:
        """[n, S d]: each site's activations from the features' coefficients, side by side."""
        spec = self.spec
        parts = [(coefficients * self.strength[:, s]) @ self.site_dictionary[s] for s in range(spec.sites)]
        x = torch.cat(parts, dim=1)
        x += spec.noise_std * torch.randn(x.shape, generator=generator) / math.sqrt(spec.d_in)
        return x

    def tensors(self) -> dict[str, Tensor]:
        return super().tensors() | {"strength": self.strength.contiguous(), "kind": self.kind.contiguous(),
                                    "site": self.site.contiguous(),
                                    "site_dictionary": self.site_dictionary.contiguous()}


def make_world(spec: SyntheticSpec) -> SyntheticWorld:
    """The world of a spec: one site (SyntheticWorld, unchanged), several (MultiSiteWorld) or layers
    (synthetic_layers.LayeredWorld)."""
    if spec.layers:
        from saelab.data.synthetic_layers import LayeredWorld

        return LayeredWorld(spec)
    return SyntheticWorld(spec) if spec.sites == 1 else MultiSiteWorld(spec)
