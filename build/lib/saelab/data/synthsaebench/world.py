"""A SynthSAEBench world: its ground truth, and samples from it, with the interface of
saelab.data.synthetic.SyntheticWorld (dictionary, probability, parent, sample, stream, held_out, tensors), so the
ground-truth metrics and ground_truth.safetensors work on it unchanged.

`build_world(spec)` makes one from a spec, deterministically by spec.world_seed, drawing what SAELens's
`SyntheticModel` draws for the same seed (directions and bias: seed; magnitude stds: seed + 1; copula: seed + 4;
orthogonalisation equal up to rounding, directions.py); saelens_io loads one saved by SAELens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from saelab.data.synthsaebench import magnitudes
from saelab.data.synthsaebench.copula import Copula, random_copula
from saelab.data.synthsaebench.directions import orthogonalize, random_directions
from saelab.data.synthsaebench.expectation import marginal_probability
from saelab.data.synthsaebench.hierarchy import Hierarchy, build_forest
from saelab.data.synthsaebench.probabilities import zipf_probabilities
from saelab.data.synthsaebench.sampler import ActivationSampler
from saelab.data.synthsaebench.spec import SynthSAEBenchSpec

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_003  # the held-out set's generator: world_seed + this
CHUNK = 4096  # samples drawn at once


class SynthSAEBenchWorld:
    """Ground truth and sampler of one world. `config` is its SAELens synthetic_model_config.json content."""

    def __init__(self, dictionary: Tensor, bias: Tensor, sampling_probability: Tensor, mean_magnitude: Tensor,
                 std_magnitude: Tensor, copula: Copula | None, hierarchy: Hierarchy | None, config: dict[str, Any],
                 seed: int):
        self.dictionary = dictionary.float().contiguous()  # [N, d] unit rows
        self.bias = bias.float()  # [d]
        self.sampling_probability = sampling_probability.float()  # [N] q: what each feature fires with, raw
        self.mean_magnitude, self.std_magnitude = mean_magnitude.float(), std_magnitude.float()
        self.copula, self.hierarchy, self.config, self.seed = copula, hierarchy, config, seed
        n = len(self.dictionary)
        self.parent = hierarchy.parent.clone() if hierarchy is not None else torch.full((n,), -1, dtype=torch.long)
        # Marginal P(feature fires), copula correlations aside (expectation.py).
        self.probability = marginal_probability(self.sampling_probability, self.mean_magnitude, self.std_magnitude,
                                                hierarchy).float()
        self.sampler = ActivationSampler(self.sampling_probability, self.mean_magnitude, self.std_magnitude,
                                         copula, hierarchy)
        self._eval_generator_seed = seed + EVAL_SEED_OFFSET

    @property
    def n_features(self) -> int:
        return len(self.dictionary)

    @property
    def d_in(self) -> int:
        return self.dictionary.shape[1]

    def expected_l0(self, first: int | None = None) -> float:
        """Sum of the marginal probabilities (of features 0..first-1 when given)."""
        return float(self.probability[:first].double().sum())

    def sample_activations(self, n: int, generator: torch.Generator) -> Tensor:
        """[n, N] float32 feature activations (sampler.py)."""
        return self.sampler.sample(n, generator).T.contiguous()

    def _draw(self, n: int, generator: torch.Generator, firing: bool) -> tuple[Tensor, Tensor | None]:
        """(x [n, d], firing [n, N] bool or None), CHUNK samples at a time (the dense activations of a large
        world are N floats per sample); x = a D + bias summed over the firing features only."""
        xs, fired = [], []
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            acts = self.sampler.sample(size, generator)  # [N, size]
            features, rows = acts.nonzero(as_tuple=True)
            values = acts[features, rows]
            weighted = self.dictionary[features] * values.unsqueeze(1)
            xs.append(self.bias.expand(size, -1).clone().index_add_(0, rows, weighted))
            if firing:
                fired.append((acts > 0).T)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        return x, (torch.cat(fired) if firing else None)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x [n, d] float32 = a D + bias, firing [n, N] bool = a > 0) drawn with `generator`."""
        return self._draw(n, generator, firing=True)

    def stream(self, batch: int, seed: int) -> Iterator[Tensor]:
        """Training samples forever, `batch` at a time, in the order the data seed gives."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self._draw(batch, generator, firing=False)[0]

    def held_out(self, n: int) -> tuple[Tensor, Tensor]:
        """The fixed held-out set of the world: (x [n, d], firing [n, N])."""
        return self.sample(n, torch.Generator().manual_seed(self._eval_generator_seed))

    def tensors(self) -> dict[str, Tensor]:
        """The ground truth saved with a run (ground_truth.safetensors)."""
        return {"dictionary": self.dictionary.contiguous(), "probability": self.probability.contiguous(),
                "parent": self.parent.contiguous(), "bias": self.bias.contiguous()}


def saelens_config(spec: SynthSAEBenchSpec) -> dict[str, Any]:
    """The SAELens SyntheticModelConfig (as its synthetic_model_config.json) that describes this spec's world."""
    return {
        "num_features": spec.n_features,
        "hidden_dim": spec.d_in,
        "firing_probability": {"exponent": spec.zipf_exponent, "max_prob": spec.max_probability,
                               "min_prob": spec.min_probability, "generator_name": "zipfian"},
        "hierarchy": None if spec.hierarchy_roots == 0 else {
            "total_root_nodes": spec.hierarchy_roots, "branching_factor": spec.hierarchy_branching,
            "max_depth": spec.hierarchy_depth, "mutually_exclusive_portion": 1.0,
            "mutually_exclusive_min_depth": 0, "mutually_exclusive_max_depth": None,
            "compensate_probabilities": True, "scale_children_by_parent": True},
        "orthogonalization": None if spec.orthogonalize_steps == 0 else {
            "num_steps": spec.orthogonalize_steps, "lr": spec.orthogonalize_lr, "chunk_size": 1024},
        "correlation": None if spec.copula_rank == 0 else {
            "rank": spec.copula_rank, "correlation_scale": spec.copula_std, "seed": None},
        "std_firing_magnitudes": {"mean": spec.magnitude_std_mean, "std": spec.magnitude_std_std,
                                  "min_value": None, "max_value": None, "generator_name": "folded_normal"},
        "mean_firing_magnitudes": {"start": spec.magnitude_mean_start, "end": spec.magnitude_mean_end,
                                   "generator_name": "linear"},
        "bias": spec.bias_norm,
        "dtype": "float32",
        "seed": spec.world_seed,
    }


def build_world(spec: SynthSAEBenchSpec) -> SynthSAEBenchWorld:
    """The world of `spec`, the same on every call (and SAELens's for the same config and seed)."""
    seed, n = spec.world_seed, spec.n_features
    forest = build_forest(n, spec.hierarchy_roots, spec.hierarchy_branching, spec.hierarchy_depth)
    hierarchy = Hierarchy.from_roots(forest, n) if forest else None
    copula = random_copula(n, spec.copula_rank, spec.copula_std, seed) if spec.copula_rank else None
    rows, bias = random_directions(n, spec.d_in, spec.bias_norm, seed)
    if spec.orthogonalize_steps:
        log.info("synthsaebench: orthogonalising %d directions in %d dimensions (%d Adam steps)", n, spec.d_in,
                 spec.orthogonalize_steps)
        rows = orthogonalize(rows, spec.orthogonalize_steps, spec.orthogonalize_lr)
    base = zipf_probabilities(n, spec.zipf_exponent, spec.max_probability, spec.min_probability)
    q = hierarchy.compensated(base) if hierarchy is not None else base
    std = magnitudes.folded_normal(n, spec.magnitude_std_mean, spec.magnitude_std_std,
                                   seed + magnitudes.STD_SEED_OFFSET)
    mean = magnitudes.linear(n, spec.magnitude_mean_start, spec.magnitude_mean_end)
    return SynthSAEBenchWorld(rows, bias, q, mean, std, copula, hierarchy, saelens_config(spec), seed)
