"""Synthetic activations with known ground truth (`data=synthetic`): no model, generated on the fly.

    x = sum_i a_i m_i d_i + noise_std * g / sqrt(d),    g ~ N(0, I_d)

- Features: N unit vectors d_i in R^d (N > d). Each is a Gaussian direction mixed with a random shared
  subspace of rank `overlap_rank` by `overlap`: 0 gives independent directions (|cos| ~ 1/sqrt(d)); larger
  values crowd the features into that subspace, so they overlap more.
- Firing a_i in {0, 1}: marginal probabilities follow a Zipf law, p_i proportional to (rank + 1)^-zipf_exponent,
  scaled so that E[number of firing features] = `mean_l0` (each capped at `max_probability`).
- Hierarchies: the `n_parents` most frequent features are parents, each with `children_per_parent` children
  (the next indices); a child fires only when its parent fires, with probability `child_given_parent` then.
- Correlated firing: a Gaussian copula, z = sqrt(rho) F^T u + sqrt(1 - rho) e with a random rank-
  `correlation_rank` factor F (unit columns), rho = `correlation`; feature i fires when z_i exceeds the normal
  quantile that gives it probability p_i (children: their conditional probability).
- Magnitudes m_i: log-normal with mean `magnitude_mean` and log-space spread `magnitude_std`.

The world (features, probabilities, factor) comes from `world_seed`, so every job of a sweep sees the same
truth; the order of training samples comes from the run's data seed; the held-out set is fixed by the world.
SynthSAEBench (arXiv 2602.14687) and SAELens's `sae_lens.synthetic` follow the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.errors import ConfigError, check_positive
from saelab.sections import read_section


@dataclass(frozen=True)
class SyntheticSpec:
    d_in: int = 64  # d: width of the activations
    n_features: int = 512  # N true features
    mean_l0: float = 8.0  # expected number of firing features per sample
    zipf_exponent: float = 0.5  # p_i ~ (rank + 1)^-exponent
    max_probability: float = 0.5  # cap on any feature's firing probability
    n_parents: int = 16  # features with children (the most frequent ones)
    children_per_parent: int = 3  # children of each parent (they fire only with it)
    child_given_parent: float = 0.3  # P(child fires | parent fires)
    correlation: float = 0.0  # rho of the copula's low-rank factor (0 = independent firing)
    correlation_rank: int = 8  # rank of the shared factor
    overlap: float = 0.0  # 0 = independent random directions; larger = features share a subspace
    overlap_rank: int = 16  # rank of the shared subspace
    magnitude_mean: float = 1.0  # E[m_i]
    magnitude_std: float = 0.3  # log-space standard deviation of m_i
    noise_std: float = 0.05  # isotropic noise, E||noise||^2 = noise_std^2
    world_seed: int = 0  # the features, probabilities and the held-out set
    # Several sites (data/synthetic_sites.py): each feature has a direction and a strength at every site.
    sites: int = 1  # sites the world writes, each d_in wide (> 1: a crosscoder's world)
    exclusive_fraction: float = 0.0  # features present at one site alone
    ratio_fraction: float = 0.0  # features at every site, but weak (weak_strength) at one
    weak_strength: float = 0.3  # a ratio feature's strength at its weak site (1 elsewhere)
    site_direction_overlap: float = 1.0  # 1: a feature's direction is the same at every site (a fine-tune of one
    #                                     model); 0: independent directions (different layers)
    # Layers (data/synthetic_layers.py): MLP inputs in_l and outputs out_l, a cross-layer transcoder's world.
    layers: int = 0  # L: 0 = off; > 0 = sites in_0..in_{L-1} (read) and out_0..out_{L-1} (written)
    cross_layer_fraction: float = 0.5  # features written by their home layer's MLP and every later one's

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any]) -> SyntheticSpec:
        return read_section("data.synthetic", cls, data_cfg.get("synthetic"))

    def validate(self) -> None:
        for name in ("d_in", "n_features", "correlation_rank", "overlap_rank"):
            check_positive(f"data.synthetic.{name}", getattr(self, name), integer=True)
        for name in ("n_parents", "children_per_parent", "world_seed"):
            check_positive(f"data.synthetic.{name}", getattr(self, name), allow_zero=True, integer=True)
        for name in ("mean_l0", "magnitude_mean"):
            check_positive(f"data.synthetic.{name}", getattr(self, name))
        for name in ("zipf_exponent", "magnitude_std", "noise_std", "overlap"):
            check_positive(f"data.synthetic.{name}", getattr(self, name), allow_zero=True)
        for name in ("max_probability", "child_given_parent"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"data.synthetic.{name}", getattr(self, name), "a probability in (0, 1]")
        if not 0 <= self.correlation < 1:
            raise ConfigError("data.synthetic.correlation", self.correlation, "a number in [0, 1)")
        if self.n_parents * (1 + self.children_per_parent) > self.n_features:
            raise ConfigError("data.synthetic.n_parents", self.n_parents,
                              "at most n_features / (1 + children_per_parent)")
        check_positive("data.synthetic.sites", self.sites, integer=True)
        check_positive("data.synthetic.layers", self.layers, allow_zero=True, integer=True)
        if self.layers and self.sites != 1:
            raise ConfigError("data.synthetic.layers", self.layers, "0 with data.synthetic.sites > 1 (a world has "
                              "sites or layers)")
        if not 0 <= self.cross_layer_fraction <= 1:
            raise ConfigError("data.synthetic.cross_layer_fraction", self.cross_layer_fraction, "a fraction in [0, 1]")
        for name in ("exclusive_fraction", "ratio_fraction", "site_direction_overlap"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"data.synthetic.{name}", getattr(self, name), "a fraction in [0, 1]")
        if self.exclusive_fraction + self.ratio_fraction > 1:
            raise ConfigError("data.synthetic.ratio_fraction", self.ratio_fraction,
                              f"at most 1 - exclusive_fraction ({1 - self.exclusive_fraction:g})")
        if not 0 < self.weak_strength <= 1:
            raise ConfigError("data.synthetic.weak_strength", self.weak_strength, "a number in (0, 1]")
        if self.mean_l0 > self.max_probability * self.n_features:
            raise ConfigError("data.synthetic.mean_l0", self.mean_l0, "at most max_probability x n_features")


class SyntheticWorld:
    """The ground truth of one SyntheticSpec, and samples from it."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        g = torch.Generator().manual_seed(spec.world_seed)
        d, n = spec.d_in, spec.n_features
        shared = torch.linalg.qr(torch.randn(d, min(spec.overlap_rank, d), generator=g)).Q  # [d, r]
        own = torch.randn(n, d, generator=g)
        crowded = torch.randn(n, shared.shape[1], generator=g) @ shared.T
        directions = own / own.norm(dim=1, keepdim=True) + spec.overlap * crowded / crowded.norm(dim=1, keepdim=True)
        self.dictionary = directions / directions.norm(dim=1, keepdim=True)  # [N, d] unit rows
        # Hierarchy: parents are features 0..P-1; the children of parent p are P + p*C .. P + (p+1)*C - 1.
        n_par, n_child = spec.n_parents, spec.children_per_parent
        self.parent = torch.full((n,), -1, dtype=torch.long)
        for p in range(n_par):
            self.parent[n_par + p * n_child : n_par + (p + 1) * n_child] = p
        is_child = self.parent >= 0
        self._children, self._parent_of_children = is_child.nonzero().squeeze(1), self.parent[is_child]
        # Zipf marginals for the features that are not children, scaled to the target mean L0 (capped).
        ranks = torch.arange(n, dtype=torch.float64)
        weight = (ranks + 1) ** -spec.zipf_exponent
        conditional = torch.where(is_child, torch.tensor(spec.child_given_parent, dtype=torch.float64), 0.0)
        self.probability = self._scaled_probabilities(weight, is_child, conditional)  # marginal P(a_i = 1)
        # What each feature's copula variable is compared with: its own probability, or for a child the
        # conditional one (the parent gates it).
        own_probability = torch.where(is_child, conditional, self.probability)
        self.quantile = torch.special.ndtri(1 - own_probability).float()
        factor = torch.randn(spec.correlation_rank, n, generator=g)
        self.factor = factor / factor.norm(dim=0, keepdim=True)  # unit columns: var((u F)_i) = 1
        self._eval_generator_seed = spec.world_seed + 1_000_003

    def _scaled_probabilities(self, weight: Tensor, is_child: Tensor, conditional: Tensor) -> Tensor:
        """Marginals p with sum(p) = mean_l0: free features c * weight (capped), children p_parent * q."""
        spec = self.spec
        low, high = 0.0, 1e6
        for _ in range(100):  # bisection on c
            c = (low + high) / 2
            p = self._marginals(c * weight, is_child, conditional)
            low, high = (c, high) if p.sum() < spec.mean_l0 else (low, c)
        return self._marginals(low * weight, is_child, conditional).float()

    def _marginals(self, free: Tensor, is_child: Tensor, conditional: Tensor) -> Tensor:
        p = free.clamp(max=self.spec.max_probability)
        parent_p = p[self.parent.clamp(min=0)]
        return torch.where(is_child, parent_p * conditional, p)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x [n, d] float32, firing [n, N] bool) drawn with `generator`."""
        coefficients, firing = self.codes(n, generator)
        return self.mix(coefficients, generator), firing

    def mix(self, coefficients: Tensor, generator: torch.Generator) -> Tensor:
        """x = sum_i c_i d_i + noise: the activations of the features' coefficients [n, N]."""
        x = coefficients @ self.dictionary
        x += self.spec.noise_std * torch.randn(x.shape, generator=generator) / math.sqrt(self.spec.d_in)
        return x

    def codes(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(coefficients a_i m_i [n, N], firing [n, N] bool) drawn with `generator`."""
        spec = self.spec
        e = torch.randn(n, spec.n_features, generator=generator)
        if spec.correlation > 0:
            u = torch.randn(n, spec.correlation_rank, generator=generator)
            z = math.sqrt(spec.correlation) * (u @ self.factor) + math.sqrt(1 - spec.correlation) * e
        else:
            z = e
        firing = z > self.quantile
        # A child fires only with its parent (parents are never children here).
        firing[:, self._children] &= firing[:, self._parent_of_children]
        log_m = spec.magnitude_std * torch.randn(n, spec.n_features, generator=generator)
        magnitude = spec.magnitude_mean * torch.exp(log_m - spec.magnitude_std**2 / 2)
        return firing * magnitude, firing

    def stream(self, batch: int, seed: int) -> Iterator[Tensor]:
        """Training samples forever, `batch` at a time, in the order the data seed gives."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch, generator)[0]

    def held_out(self, n: int, chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """The fixed held-out set of the world: (x [n, d], firing [n, N])."""
        generator = torch.Generator().manual_seed(self._eval_generator_seed)
        parts = [self.sample(min(chunk, n - start), generator) for start in range(0, n, chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def tensors(self) -> dict[str, Tensor]:
        """The ground truth saved with a run (ground_truth.safetensors)."""
        return {"dictionary": self.dictionary.contiguous(), "probability": self.probability.contiguous(),
                "parent": self.parent.contiguous()}
