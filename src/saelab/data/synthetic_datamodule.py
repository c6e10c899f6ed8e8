"""The LightningDataModule of a generated world (`data=synthetic`, `data=synthsaebench`): batches from the world,
with the same interface as ActivationDataModule (batches {hook: x}, per-hook scales, held-out activations), plus
the ground truth. WorldDataModule serves any world with SyntheticWorld's interface (sample, stream, held_out);
SyntheticDataModule is it for a SyntheticSpec.

Training samples come in the order of the data seed; a resumed run regenerates and skips the batches it had
trained on (generation is cheap). The normalisation scale is estimated from a separate sample of the world,
so it is the same for every job of a sweep.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from saelab.data.datamodule import Batches
from saelab.data.normalize import estimate_scale, normalised_rms
from saelab.data.position import PositionedDataModule
from saelab.data.synthetic import SyntheticSpec
from saelab.data.synthetic_sites import make_world

log = logging.getLogger(__name__)


class WorldDataModule(PositionedDataModule):
    """Batches from the world `make_world()` returns (made at setup). The normalisation scale is estimated on
    data.normalize_tokens samples drawn with world_seed + 2."""

    def __init__(self, data_cfg: Mapping[str, Any], eval_tokens: int, seed: int, hooks: list[str],
                 make_world: Callable[[], Any], world_seed: int):
        super().__init__()
        self.cfg, self.eval_tokens = data_cfg, int(eval_tokens)
        data_seed = data_cfg.get("seed")
        self.seed = int(data_seed if data_seed is not None else seed)
        self.hooks = list(dict.fromkeys(hooks))
        self.make_world, self.world_seed = make_world, int(world_seed)
        self.world: Any | None = None
        self.scales: dict[str, float] = {}
        self.input_rms: dict[str, float] = {}
        self.eval_acts: dict[str, Tensor] = {}
        self.eval_firing: Tensor | None = None  # [eval_tokens, N] bool: which true features fire
        self.eval_windows = None  # no text: no spliced metrics
        self.special = None
        self._resume_batches = 0

    def setup(self, stage: str | None = None) -> None:
        if self.world is not None:
            return
        self.world = self.make_world()
        method = str(self.cfg["normalize"])
        head, _ = self.world.sample(int(self.cfg["normalize_tokens"]),
                                    torch.Generator().manual_seed(self.world_seed + 2))
        eval_x, self.eval_firing = self.world.held_out(self.eval_tokens)
        for hook in self.hooks:
            part = self.site_part(head, hook)  # each site its own scale (one site: the whole sample)
            scale = estimate_scale(part, method)
            rms = normalised_rms(method, scale, part)
            self.scales[hook], self.input_rms[hook] = scale, rms
            self.eval_acts[hook] = self.site_part(eval_x, hook) / scale
        log.info("%s; normalisation %s: scale C = %s; %d held-out samples", self.describe(), method,
                 ", ".join(f"{self.scales[h]:.4g}" for h in self.hooks), len(eval_x))

    def site_part(self, x: Tensor, hook: str) -> Tensor:
        """A site's columns of a world's sample (a world with `site_names` writes its sites side by side; any
        other world writes one activation, which every hook reads)."""
        names = getattr(self.world, "site_names", None)
        if names is None or len(names) == 1:
            return x
        return x.chunk(len(names), dim=1)[names.index(hook)]

    def describe(self) -> str:
        """The world in one log line."""
        return (f"{type(self.world).__name__}: {self.world.dictionary.shape[0]} features in "
                f"{self.world.dictionary.shape[1]} dimensions, mean L0 {float(self.world.probability.sum()):.1f}")

    def train_batches(self) -> Iterator[dict[str, Tensor]]:
        rank, world = (0, 1) if self.trainer is None else (int(self.trainer.global_rank), int(self.trainer.world_size))
        skip, self._resume_batches = self._resume_batches, 0
        stream = self.world.stream(int(self.cfg["batch_size"]), self.seed)
        for x in itertools.islice(stream, rank + skip * world, None, world):
            yield {hook: self.site_part(x, hook) / self.scales[hook] for hook in self.hooks}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Batches(self.train_batches), batch_size=None, num_workers=0)


class SyntheticDataModule(WorldDataModule):
    """`data=synthetic`: a SyntheticWorld of the data section's SyntheticSpec."""

    def __init__(self, data_cfg: Mapping[str, Any], eval_tokens: int, seed: int, hooks: list[str]):
        spec = SyntheticSpec.from_config(data_cfg)
        super().__init__(data_cfg, eval_tokens, seed, hooks, make_world=lambda: make_world(spec),
                         world_seed=spec.world_seed)
        self.spec = spec

    def describe(self) -> str:
        return (f"synthetic data: {self.spec.n_features} features in {self.spec.d_in} dimensions, mean L0 "
                f"{float(self.world.probability.sum()):.1f}, {self.spec.n_parents} parents x "
                f"{self.spec.children_per_parent} children")
