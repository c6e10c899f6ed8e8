"""The LightningDataModule of `data=synthetic`: batches from a SyntheticWorld, with the same interface as
ActivationDataModule (batches {hook: x}, per-hook scales, held-out activations), plus the ground truth.

Training samples come in the order of the data seed; a resumed run regenerates and skips the batches it had
trained on (generation is cheap). The normalisation scale is estimated from a separate sample of the world,
so it is the same for every job of a sweep.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from saelab.data.datamodule import Batches
from saelab.data.normalize import estimate_scale, normalised_rms
from saelab.data.synthetic import SyntheticSpec, SyntheticWorld

log = logging.getLogger(__name__)


class SyntheticDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: Mapping[str, Any], eval_tokens: int, seed: int, hooks: list[str]):
        super().__init__()
        self.cfg, self.eval_tokens = data_cfg, int(eval_tokens)
        data_seed = data_cfg.get("seed")
        self.seed = int(data_seed if data_seed is not None else seed)
        self.hooks = list(dict.fromkeys(hooks))
        self.spec = SyntheticSpec.from_config(data_cfg)
        self.world: SyntheticWorld | None = None
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
        self.world = SyntheticWorld(self.spec)
        method = str(self.cfg["normalize"])
        head, _ = self.world.sample(int(self.cfg["normalize_tokens"]),
                                    torch.Generator().manual_seed(self.spec.world_seed + 2))
        scale = estimate_scale(head, method)
        rms = normalised_rms(method, scale, head)
        eval_x, self.eval_firing = self.world.held_out(self.eval_tokens)
        for hook in self.hooks:
            self.scales[hook], self.input_rms[hook], self.eval_acts[hook] = scale, rms, eval_x / scale
        log.info("synthetic data: %d features in %d dimensions, mean L0 %.1f, %d parents x %d children; "
                 "normalisation %s: scale C = %.4g; %d held-out samples", self.spec.n_features, self.spec.d_in,
                 float(self.world.probability.sum()), self.spec.n_parents, self.spec.children_per_parent, method,
                 scale, len(eval_x))

    def state_dict(self) -> dict[str, Any]:
        batches = self._resume_batches
        if self.trainer is not None:
            batches = int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        return {"batches_consumed": batches, "scales": dict(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_batches = int(state["batches_consumed"])

    def train_batches(self) -> Iterator[dict[str, Tensor]]:
        rank, world = (0, 1) if self.trainer is None else (int(self.trainer.global_rank), int(self.trainer.world_size))
        skip, self._resume_batches = self._resume_batches, 0
        stream = self.world.stream(int(self.cfg["batch_size"]), self.seed)
        for x in itertools.islice(stream, rank + skip * world, None, world):
            yield {hook: x / self.scales[hook] for hook in self.hooks}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Batches(self.train_batches), batch_size=None, num_workers=0)
