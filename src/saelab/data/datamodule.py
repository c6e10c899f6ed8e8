"""The LightningDataModule: documents -> windows -> activations -> shuffle buffer -> normalised batches.

With `data.cache` on, the activations come from an on-disk cache (saelab.data.cache) built on first use.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from saelab.data.activations import activation_chunks, collect
from saelab.data.buffer import ShuffleBuffer
from saelab.data.cache import ActivationCache, CacheReader, ModelSpec, Request, cache_root, key_inputs
from saelab.data.model import LoadedModel
from saelab.data.normalize import estimate_scale
from saelab.data.text_sources import load_documents
from saelab.data.tokens import SpecialTokens, pack, split_documents, tokenize
from saelab.errors import ConfigError

log = logging.getLogger(__name__)


class _Batches(IterableDataset):
    """Wraps a generator function so a DataLoader (batch_size=None) can iterate it."""

    def __init__(self, make_iterator):
        self.make_iterator = make_iterator

    def __iter__(self) -> Iterator[Tensor]:
        return self.make_iterator()


def _auto_cache_dir(data_cfg: Mapping[str, Any]) -> str:
    """`paths.cache_dir` of the config `data_cfg` belongs to (the default layout when it is detached)."""
    found = OmegaConf.select(data_cfg, "..paths.cache_dir") if isinstance(data_cfg, DictConfig) else None
    return str(found) if found else "outputs/cache"


class ActivationDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: Mapping[str, Any], model: LoadedModel, eval_tokens: int, seed: int,
                 cache_dir: str | None = None, train_tokens: int | None = None):
        """`cache_dir` is where `data.cache=auto` keeps caches (default: the config's paths.cache_dir);
        `train_tokens` is the number of activations training will draw (default: data.train_tokens)."""
        super().__init__()
        self.cfg, self.model, self.eval_tokens, self.seed = data_cfg, model, int(eval_tokens), int(seed)
        self.special = SpecialTokens.from_tokenizer(model.tokenizer)
        self.train_tokens = int(float(train_tokens if train_tokens is not None else data_cfg["train_tokens"]))
        # Checked here, before any text is read, any forward pass runs or any directory is made.
        ctx = int(data_cfg["context_size"])
        if model.n_ctx is not None and ctx > model.n_ctx:
            raise ConfigError("data.context_size", ctx, f"at most the model's n_ctx ({model.n_ctx})")
        self.cache_root = cache_root(data_cfg.get("cache"), cache_dir or _auto_cache_dir(data_cfg))
        self.cache: CacheReader | None = None  # set when activations are read from the on-disk cache
        self.train_windows: Tensor | None = None  # not kept when activations come from the cache
        self.eval_windows: Tensor | None = None  # held-out token windows, in corpus order (spliced metrics)
        self.eval_acts: Tensor | None = None  # normalised held-out activations
        self.scale: float | None = None
        self._head: Tensor | None = None  # the activations used to estimate the scale, trained on first
        self._ready = False
        self._resume_batches = 0  # batches this rank consumed before the checkpoint it resumes from

    # -- set-up -----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if self.cache_root is not None:
            self._setup_from_cache()
        else:
            self._setup_streaming()
        self._ready = True

    def windows(self) -> dict[str, Tensor]:
        """The corpus as packed token windows: {"train": ..., "eval": ...} (disjoint by document)."""
        cfg, ctx, tok = self.cfg, int(self.cfg["context_size"]), self.model.tokenizer
        docs = load_documents(cfg)
        train_docs, held_out_docs = split_documents(docs, float(cfg["eval_fraction"]))
        train_windows = pack(tokenize(train_docs, tok), ctx, self.special, bool(cfg["prepend_bos"]))
        eval_windows = pack(tokenize(held_out_docs, tok), ctx, self.special, bool(cfg["prepend_bos"]))
        if len(train_windows) == 0:
            raise ConfigError("data.path", cfg.get("path"), f"text with at least {ctx} training tokens")
        if len(eval_windows) == 0:
            raise ConfigError("data.eval_fraction", cfg["eval_fraction"],
                              "a fraction that leaves held-out text")
        log.info("corpus: %d train windows, %d held-out windows of %d tokens (%d documents)",
                 len(train_windows), len(eval_windows), ctx, len(docs))
        return {"train": train_windows, "eval": eval_windows}

    def _setup_from_cache(self) -> None:
        cfg = self.cfg
        inputs = key_inputs(cfg, ModelSpec.of(self.model), self.special)
        cache = ActivationCache(self.cache_root, inputs, self.model.d_model)
        # The budget plus one buffer fill, so the last batches do not repeat cached activations.
        train_tokens = self.train_tokens + int(cfg["buffer_tokens"])
        request = Request(train_tokens, self.eval_tokens, str(cfg["normalize"]), int(cfg["normalize_tokens"]))
        self.cache = cache.open(request, self.windows, self._generate)
        self.scale, self.eval_windows = self.cache.scale, self.cache.eval_windows
        self.eval_acts = self.cache.eval_activations(self.eval_tokens) / self.scale
        log.info("normalisation %s: scale C = %.4g (from the cache's first %d activations); %d held-out "
                 "activations; %d cached train activations per epoch", cfg["normalize"], self.scale,
                 int(cfg["normalize_tokens"]), len(self.eval_acts), self.cache.train_tokens)

    def _setup_streaming(self) -> None:
        cfg = self.cfg
        windows = self.windows()
        self.train_windows, self.eval_windows = windows["train"], windows["eval"]
        # Held-out activations, kept in memory for evaluation only.
        raw_eval = collect(self._chunks(self.eval_windows, shuffle=False, epochs=1), self.eval_tokens)
        # The scale comes from the first training activations; they are then trained on, not wasted.
        self._train_iter = self._chunks(self.train_windows, shuffle=True, epochs=None)
        self._head = collect(self._train_iter, int(cfg["normalize_tokens"]))
        self.scale = estimate_scale(self._head, str(cfg["normalize"]))
        self.eval_acts = raw_eval / self.scale
        log.info("normalisation %s: scale C = %.4g (from %d activations); %d held-out activations",
                 cfg["normalize"], self.scale, len(self._head), len(self.eval_acts))

    def _generate(self, windows: Tensor) -> Iterator[Tensor]:
        """Activations of windows in their order, for the cache."""
        return self._chunks(windows, shuffle=False, epochs=1)

    def _chunks(self, windows: Tensor, shuffle: bool, epochs: int | None) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return activation_chunks(self.model, windows, self.special, int(self.cfg["model_batch_size"]),
                                 generator=generator, epochs=epochs)

    # -- data position: saved in checkpoints so a resumed run continues the stream where it stopped ---------
    def state_dict(self) -> dict[str, Any]:
        """Batches this rank has trained on, and the normalisation scale, at checkpoint time."""
        return {"batches_consumed": self._batches_consumed(), "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_batches = int(state["batches_consumed"])
        self.scale = float(state["scale"])

    def _batches_consumed(self) -> int:
        # Lightning's count of training batches whose step ran (a skipped non-finite batch counts too); it
        # includes the current batch when a checkpoint is written at its end. Prefetched batches do not count.
        if self.trainer is None:
            return self._resume_batches
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    # -- loaders --------------------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def train_batches(self) -> Iterator[Tensor]:
        """This rank's training batches, from the data position of the checkpoint being resumed (if any)."""
        stream = self._rank_batches(*self._rank_and_world())
        skip, self._resume_batches = self._resume_batches, 0
        if skip:
            log.info("resuming the activation stream after %d batches", skip)
        return itertools.islice(stream, skip, None)

    def _rank_batches(self, rank: int, world: int) -> Iterator[Tensor]:
        """Batches for one of `world` ranks; the ranks' batches are disjoint and together make the whole stream.

        Cached activations: every rank draws the same global stream and keeps every world-th batch (reads are
        cheap). Generated activations: each rank runs the model on its own share of the training windows.
        """
        batch_size, buffer_tokens, scale = int(self.cfg["batch_size"]), int(self.cfg["buffer_tokens"]), self.scale
        if self.cache is not None:  # permuted groups of buffer_tokens cached activations: no shuffle buffer
            generator = torch.Generator().manual_seed(self.seed)
            yield from itertools.islice(self.cache.batches(generator, batch_size, buffer_tokens, scale), rank, None,
                                        world)
            return
        if world == 1:  # the activations that set the scale are trained on first, not wasted
            head, self._head = self._head, None
            chunks = itertools.chain([head] if head is not None else [], self._train_iter)
        else:
            chunks = self._chunks(self.train_windows[rank::world], shuffle=True, epochs=None)
        generator = torch.Generator().manual_seed(self.seed + 1 + rank)
        for batch in ShuffleBuffer(chunks, buffer_tokens, batch_size, generator):
            yield batch / scale

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self.train_batches), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        batch_size = int(self.cfg["batch_size"])
        return DataLoader(TensorDataset(self.eval_acts), batch_size=batch_size, shuffle=False)
