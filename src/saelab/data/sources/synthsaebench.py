"""`data=synthsaebench`: activations generated from a SynthSAEBench world (saelab.data.synthsaebench), no model:
built from `data.synthsaebench.*` (default: the paper's 16k world), or loaded from a directory in SAELens's
format (`data.synthsaebench.path`). The world is the ground truth the ground-truth metrics measure against.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from saelab.data.sources.base import DataSource
from saelab.data.synthsaebench import SynthSAEBenchSpec, build_world, load_world, world_of
from saelab.data.synthsaebench.saelens_io import read_config
from saelab.errors import ConfigError
from saelab.sites import Sites

HOOK = "synthetic"


@functools.cache
def expected_l0(spec: SynthSAEBenchSpec) -> float:
    """The world's expected L0 (copula aside): a built world's needs no orthogonalised directions, so they are
    skipped; a saved world is loaded. Once per spec, however many jobs ask."""
    world = load_world(spec.path) if spec.path is not None else build_world(replace(spec, orthogonalize_steps=0))
    return world.expected_l0()


class SynthSAEBenchSource(DataSource):
    name = "synthsaebench"
    needs_model = False
    d_in_field = "data.synthsaebench.d_in"

    def __init__(self, data_cfg: Mapping[str, Any]):
        super().__init__(data_cfg)
        self.spec = SynthSAEBenchSpec.from_config(data_cfg)
        self.saved: dict[str, Any] | None = None  # a loaded world's synthetic_model_config.json
        if self.spec.path is not None:
            try:
                self.saved = read_config(self.spec.path)
            except (OSError, ValueError) as err:
                raise ConfigError("data.synthsaebench.path", self.spec.path,
                                  f"a directory holding a SAELens synthetic model ({err})") from None

    @property
    def d_in(self) -> int | None:
        return int(self.saved["hidden_dim"]) if self.saved is not None else int(self.spec.d_in)

    @property
    def world_seed(self) -> int:
        if self.saved is not None:
            return int(self.saved.get("seed") or 0)
        return int(self.spec.world_seed)

    @property
    def mean_l0(self) -> float:
        return expected_l0(self.spec)

    def own_key_inputs(self) -> dict[str, Any]:
        if self.saved is not None:
            return {"path": str(Path(self.spec.path).expanduser().resolve()), "config": self.saved}
        return asdict(self.spec)

    def sites(self, model_cfg: Mapping[str, Any]) -> Sites:
        return Sites.of(HOOK)

    def datamodule(self, data_cfg, model, eval_tokens, seed, *, cache_dir, train_tokens, hooks):
        from saelab.data.synthetic_datamodule import WorldDataModule

        return WorldDataModule(data_cfg, eval_tokens, seed, hooks, make_world=lambda: world_of(self.spec),
                               world_seed=self.world_seed)

    def ground_truth(self, datamodule):
        return datamodule.world
