"""`data=synthetic`: activations generated from a known world of features (saelab.data.synthetic), no model.

The SAE's d_in is the world's; every job reads the world's sites: one pseudo-hook, "synthetic", or with
data.synthetic.sites > 1 site_0 .. site_{S-1} (a crosscoder reads them all); the world is the ground truth the
ground-truth metrics measure against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from saelab.data.sources.base import DataSource
from saelab.data.synthetic import SyntheticSpec
from saelab.data.synthetic_layers import layer_site_names
from saelab.data.synthetic_sites import site_names
from saelab.sites import Sites

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

    def sites(self, model_cfg: Mapping[str, Any]) -> Sites:
        """Every site of the world: its one activation, its sites side by side, or its layers' MLP inputs (read)
        and outputs (written: a cross-layer transcoder, or per-layer transcoders with sae.cross_layer=false)."""
        if self.spec.layers:
            return Sites.of(*layer_site_names(self.spec.layers))
        return Sites.of(site_names(self.spec.sites))

    def datamodule(self, data_cfg, model, eval_tokens, seed, *, cache_dir, train_tokens, hooks):
        from saelab.data.synthetic_datamodule import SyntheticDataModule

        return SyntheticDataModule(data_cfg, eval_tokens, seed, hooks=hooks)

    def ground_truth(self, datamodule):
        return datamodule.world
