"""The LightningDataModule of `data=saelens_cache`: batches {hook: x / C} read from a SAELens cache, held-out
activations and the normalisation scale, with no model (data/protocol.py's StreamDataModule).

Held-out split. A SAELens cache has no documents and no split, so saelab holds out a fraction f = data.eval_fraction
of its context windows: window i of each data file (counting from 0) is held out when floor((i+1) f) > floor(i f),
i.e. every 1/f-th window, spread evenly through every file. It depends on the cache alone (never on the seed, the
budget or the file order a run reads in), so every run and `saelab-eval` on a cache evaluate on the same windows,
and no training window is ever one of them. The held-out activations are the first eval.tokens rows of those
windows in stored order.

Rows. Every position of a window is a row except those whose token id is excluded (sources/saelens_cache.py: the
special tokens, as SAELens's ActivationsStore filters by its exclude_special_tokens).

Order. The scale C is estimated on the first data.normalize_tokens training rows in stored order (the same for every
seed). Training reads the data files in an order drawn afresh each epoch from data.seed, record batch by record batch,
through saelab's shuffle buffer (data.buffer_tokens), cycling over the cache as often as the budget asks. A resumed
run replays the stream and skips the batches it had trained on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from saelab.data.activations import collect
from saelab.data.buffer import ShuffleBuffer
from saelab.data.datamodule import Batches
from saelab.data.normalize import estimate_scale, normalised_rms
from saelab.data.position import PositionedDataModule
from saelab.data.saelens_cache import SAELensCache
from saelab.errors import ConfigError

log = logging.getLogger(__name__)


def held_out(index: np.ndarray, fraction: float) -> np.ndarray:
    """Which windows (their indices within a data file) are held out: every 1/fraction-th, evenly spread."""
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


class SAELensCacheDataModule(PositionedDataModule):
    """Training batches, scales and held-out activations of one hook of a SAELens cache."""

    def __init__(self, data_cfg: Mapping[str, Any], eval_tokens: int, seed: int, hooks: list[str],
                 cache: SAELensCache, excluded: frozenset[int]):
        super().__init__()
        self.cfg, self.eval_tokens = data_cfg, int(eval_tokens)
        data_seed = data_cfg.get("seed")
        self.seed = int(data_seed if data_seed is not None else seed)
        self.hooks = list(dict.fromkeys(hooks))
        self.cache, self.excluded = cache, np.array(sorted(excluded), dtype=np.int64)
        self.eval_fraction = float(data_cfg["eval_fraction"])
        self.scales: dict[str, float] = {}
        self.input_rms: dict[str, float] = {}
        self.eval_acts: dict[str, Tensor] = {}
        self.eval_firing = None  # no world of true features behind a cache
        self.eval_windows = None  # no model: no spliced metrics
        self.special = None
        self._ready = False
        self._resume_batches = 0

    def rows(self, hook: str, held: bool, files: list[int] | None = None) -> Iterator[np.ndarray]:
        """float32 [n, d] rows of the held-out (`held`) or training windows, excluded positions left out, chunk by
        chunk; `files`: the data files' order (default: stored order)."""
        d_in = self.cache.hooks[hook][1]
        for part in self.cache.windows(hook, files=files):
            pick = held_out(np.arange(part.start, part.start + len(part.activations)), self.eval_fraction) == held
            acts = part.activations[pick].reshape(-1, d_in)
            if part.token_ids is not None and len(self.excluded):
                acts = acts[~np.isin(part.token_ids[pick].reshape(-1), self.excluded)]
            if len(acts):
                yield acts

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        method, wanted = str(self.cfg["normalize"]), int(self.cfg["normalize_tokens"])
        for hook in self.hooks:
            head = _first_rows(self.rows(hook, held=False), wanted)
            if len(head) == 0:
                raise ConfigError("data.path", self.cfg.get("path"), "a cache with training rows (every position of "
                                  "its training windows is excluded, or it has too few windows)")
            held = _first_rows(self.rows(hook, held=True), self.eval_tokens)
            if len(held) == 0:
                raise ConfigError("data.eval_fraction", self.eval_fraction, "a fraction that holds out at least one "
                                  "window with rows")
            scale = estimate_scale(head, method)
            self.scales[hook], self.input_rms[hook] = scale, normalised_rms(method, scale, head)
            self.eval_acts[hook] = held / scale
            log.info("SAELens cache %s at %s (windows of %d, %d data files, %d token ids excluded): normalisation %s: "
                     "scale C = %.4g (from %d activations); %d held-out activations", self.cache.location, hook,
                     self.cache.hooks[hook][0], len(self.cache.files), len(self.excluded), method, scale, len(head),
                     len(held))
        self._ready = True

    # -- loaders --------------------------------------------------------------------------------------------
    def epochs(self, hook: str) -> Iterator[Tensor]:
        """The training rows, epoch after epoch, the data files in a new seeded order each epoch."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in itertools.count():
            order = torch.randperm(len(self.cache.files), generator=generator).tolist()
            for rows in self.rows(hook, held=False, files=order):
                yield torch.from_numpy(rows)

    def train_batches(self) -> Iterator[dict[str, Tensor]]:
        """This rank's batches (every world-th of the one global stream), after the resumed position."""
        rank, world = (0, 1) if self.trainer is None else (int(self.trainer.global_rank), int(self.trainer.world_size))
        skip, self._resume_batches = self._resume_batches, 0
        hook = self.hooks[0]
        generator = torch.Generator().manual_seed(self.seed + 1)
        stream = ShuffleBuffer(self.epochs(hook), int(self.cfg["buffer_tokens"]), int(self.cfg["batch_size"]),
                               generator)
        for batch in itertools.islice(stream, rank + skip * world, None, world):
            yield {hook: batch / self.scales[hook]}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Batches(self.train_batches), batch_size=None, num_workers=0)


def _first_rows(chunks: Iterator[np.ndarray], n: int) -> Tensor:
    """The first n rows of a chunk stream (fewer if it ends first), read no further than needed."""
    return collect((torch.from_numpy(chunk) for chunk in chunks), n)
