"""The knobs of a SynthSAEBench world (`data.synthsaebench.*`), defaulting to the paper's standard 16k world
(arXiv 2602.14687; SAELens's `sae_lens.synthetic`, 6.37 and later; its `SyntheticModelConfig` with seed 42).

Every field is checked by `from_config`, which raises a one-line ConfigError naming the field. With `path` set,
the world is loaded from a directory in SAELens's on-disk format instead (saelens_io), and every other field is
ignored: the files say what the world is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from saelab.errors import ConfigError, check_integer, check_positive
from saelab.sections import read_section

PREFIX = "data.synthsaebench"


@dataclass(frozen=True)
class SynthSAEBenchSpec:
    n_features: int = 16_384  # N true features
    d_in: int = 768  # d: width of the activations
    hierarchy_roots: int = 128  # roots of the hierarchy forest: features 0 .. roots - 1 (0 = no hierarchy)
    hierarchy_branching: int = 4  # children of every non-leaf node
    hierarchy_depth: int = 3  # levels below the roots (1: roots with leaf children)
    zipf_exponent: float = 0.5  # base firing probability ~ (i + 1)^-exponent, min-max mapped by index
    max_probability: float = 0.4  # the base probability of feature 0
    min_probability: float = 5e-4  # the base probability of feature N - 1
    copula_rank: int = 25  # rank of the Gaussian copula's factor (0 = features fire independently)
    copula_std: float = 0.1  # standard deviation of the factor's entries
    magnitude_mean_start: float = 5.0  # mean magnitude of feature 0, falling linearly to ...
    magnitude_mean_end: float = 4.0  # ... the mean magnitude of feature N - 1
    magnitude_std_mean: float = 0.5  # per-feature magnitude std is |N(magnitude_std_mean, magnitude_std_std^2)|
    magnitude_std_std: float = 0.5
    orthogonalize_steps: int = 100  # Adam steps on the directions' orthogonality loss (0 = random directions)
    orthogonalize_lr: float = 3e-4
    bias_norm: float = 0.5  # norm of the constant vector added to every sample (0 = none)
    world_seed: int = 42  # every random draw of the world (SAELens's `seed`: 42 gives SAELens's world)
    path: str | None = None  # a directory holding a world in SAELens's format: load it instead of building one

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any]) -> SynthSAEBenchSpec:
        """The spec of `data_cfg["synthsaebench"]` (absent fields take the defaults), checked."""
        return read_section(PREFIX, cls, data_cfg.get("synthsaebench"))

    def validate(self) -> None:
        """ConfigError naming the first field that is not allowed."""
        for name in ("n_features", "d_in"):
            check_positive(f"{PREFIX}.{name}", getattr(self, name), integer=True)
        for name in ("hierarchy_roots", "copula_rank", "orthogonalize_steps"):
            check_positive(f"{PREFIX}.{name}", getattr(self, name), allow_zero=True, integer=True)
        for name in ("hierarchy_branching", "hierarchy_depth"):
            check_positive(f"{PREFIX}.{name}", getattr(self, name), integer=True)
        if self.hierarchy_roots and self.hierarchy_branching < 2:
            raise ConfigError(f"{PREFIX}.hierarchy_branching", self.hierarchy_branching,
                              "at least 2 (siblings are mutually exclusive)")
        for name in ("zipf_exponent", "magnitude_mean_start", "magnitude_mean_end", "magnitude_std_std",
                     "orthogonalize_lr"):
            check_positive(f"{PREFIX}.{name}", getattr(self, name))
        for name in ("copula_std", "magnitude_std_mean", "bias_norm"):
            check_positive(f"{PREFIX}.{name}", getattr(self, name), allow_zero=True)
        if not 0 < self.max_probability <= 1:
            raise ConfigError(f"{PREFIX}.max_probability", self.max_probability, "a probability in (0, 1]")
        if not 0 < self.min_probability < self.max_probability:
            raise ConfigError(f"{PREFIX}.min_probability", self.min_probability,
                              "a probability in (0, max_probability)")
        if self.hierarchy_roots > self.n_features:
            raise ConfigError(f"{PREFIX}.hierarchy_roots", self.hierarchy_roots, "at most n_features")
        check_integer(f"{PREFIX}.world_seed", self.world_seed)
        if self.path is not None and not isinstance(self.path, str):
            raise ConfigError(f"{PREFIX}.path", self.path, "null or a directory holding a SAELens synthetic model")

    @property
    def hierarchy_size(self) -> int:
        """Features the hierarchy covers: roots x (1 + b + ... + b^depth), capped at N (laid out by index)."""
        per_tree = sum(self.hierarchy_branching**level for level in range(self.hierarchy_depth + 1))
        return min(self.hierarchy_roots * per_tree, self.n_features)
