"""The LightningDataModule: documents -> windows -> activations -> shuffle buffer -> normalised batches."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from saelab.data.activations import activation_chunks, collect
from saelab.data.buffer import ShuffleBuffer
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


class ActivationDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: Mapping[str, Any], model: LoadedModel, eval_tokens: int, seed: int):
        super().__init__()
        self.cfg, self.model, self.eval_tokens, self.seed = data_cfg, model, int(eval_tokens), int(seed)
        self.special = SpecialTokens.from_tokenizer(model.tokenizer)
        self.train_windows: Tensor | None = None
        self.eval_acts: Tensor | None = None  # normalised held-out activations
        self.scale: float | None = None
        self._head: Tensor | None = None  # the activations used to estimate the scale, trained on first

    # -- set-up -----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        cfg = self.cfg
        docs = load_documents(cfg)
        train_docs, held_out_docs = split_documents(docs, float(cfg["eval_fraction"]))
        ctx = int(cfg["context_size"])
        if self.model.n_ctx is not None and ctx > self.model.n_ctx:
            raise ConfigError("data.context_size", ctx, f"at most the model's n_ctx ({self.model.n_ctx})")
        tok = self.model.tokenizer
        self.train_windows = pack(tokenize(train_docs, tok), ctx, self.special, bool(cfg["prepend_bos"]))
        eval_windows = pack(tokenize(held_out_docs, tok), ctx, self.special, bool(cfg["prepend_bos"]))
        if len(self.train_windows) == 0:
            raise ConfigError("data.path", cfg.get("path"), f"text with at least {ctx} training tokens")
        if len(eval_windows) == 0:
            raise ConfigError("data.eval_fraction", cfg["eval_fraction"], "a fraction that leaves held-out text")
        log.info("corpus: %d train windows, %d held-out windows of %d tokens (%d documents)",
                 len(self.train_windows), len(eval_windows), ctx, len(docs))
        # Held-out activations, kept in memory for evaluation only.
        raw_eval = collect(self._chunks(eval_windows, shuffle=False, epochs=1), self.eval_tokens)
        # The scale comes from the first training activations; they are then trained on, not wasted.
        self._train_iter = self._chunks(self.train_windows, shuffle=True, epochs=None)
        self._head = collect(self._train_iter, int(cfg["normalize_tokens"]))
        self.scale = estimate_scale(self._head, str(cfg["normalize"]))
        self.eval_acts = raw_eval / self.scale
        log.info("normalisation %s: scale C = %.4g (from %d activations); %d held-out activations",
                 cfg["normalize"], self.scale, len(self._head), len(self.eval_acts))

    def _chunks(self, windows: Tensor, shuffle: bool, epochs: int | None) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return activation_chunks(self.model, windows, self.special, int(self.cfg["model_batch_size"]),
                                 generator=generator, epochs=epochs)

    # -- loaders --------------------------------------------------------------------------------------------
    def train_batches(self) -> Iterator[Tensor]:
        head, self._head = self._head, None
        chunks = itertools.chain([head] if head is not None else [], self._train_iter)
        buffer = ShuffleBuffer(chunks, int(self.cfg["buffer_tokens"]), int(self.cfg["batch_size"]),
                               torch.Generator().manual_seed(self.seed + 1))
        scale = self.scale
        for batch in buffer:
            yield batch / scale

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self.train_batches), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.eval_acts), batch_size=int(self.cfg["batch_size"]), shuffle=False)
