"""`data=synthetic`: activations generated from a known world of features (saelab.data.synthetic), no model.

The SAE's d_in is the world's; every job reads one pseudo-hook, "synthetic"; the world is the ground truth the
ground-truth metrics measure against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from saelab.data.sources.base import DataSource
from saelab.data.synthetic import SyntheticSpec

HOOK = "synthetic"


class SyntheticSource(DataSource):
    name = "synthetic"
    needs_model = False
    d_in_field = "data.synthetic.d_in"

    def __init__(self, data_cfg: Mapping[str, Any]):
        super().__init__(data_cfg)
        self.spec = SyntheticSpec.from_config(data_cfg)

    @property
    def d_in(self) -> int | None:
        return int(self.spec.d_in)

    @property
    def mean_l0(self) -> float:
        return float(self.spec.mean_l0)  # the marginals are scaled to it exactly (data/synthetic.py)

    def own_key_inputs(self) -> dict[str, Any]:
        return asdict(self.spec)

    def hooks(self, model_cfg: Mapping[str, Any]) -> list[str]:
        return [HOOK]

    def datamodule(self, data_cfg, model, eval_tokens, seed, *, cache_dir, train_tokens, hooks):
        from saelab.data.synthetic_datamodule import SyntheticDataModule

        return SyntheticDataModule(data_cfg, eval_tokens, seed, hooks=hooks)

    def ground_truth(self, datamodule):
        return datamodule.world
