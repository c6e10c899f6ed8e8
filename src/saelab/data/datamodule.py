"""The LightningDataModule: documents -> windows -> activations -> shuffle buffer -> normalised batches.

With `data.cache` on, the activations come from an on-disk cache (saelab.data.cache) built on first use.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from saelab.data.activations import activation_chunks, collect
from saelab.data.buffer import ShuffleBuffer
from saelab.data.cache import ActivationCache, CacheReader, build_share, finish, open_caches
from saelab.data.cache_key import KeyedSource, ModelSpec, cache_store, key_inputs
from saelab.data.cache_manifest import Request
from saelab.data.model import LoadedModel
from saelab.data.normalize import estimate_scale, normalised_rms
from saelab.data.position import PositionedDataModule
from saelab.data.prefetch import Prefetch
from saelab.data.tokens import Document, SpecialTokens, pack, split_documents, tokenize
from saelab.errors import ConfigError, check_positive

log = logging.getLogger(__name__)


class DocumentSource(KeyedSource, Protocol):
    """What the datamodule needs of its source (saelab.data.sources.TextSource is one): documents and a key."""

    def documents(self) -> list[Document]: ...


class Batches(IterableDataset):
    """Wraps a generator function so a DataLoader (batch_size=None) can iterate it."""

    def __init__(self, make_iterator):
        self.make_iterator = make_iterator

    def __iter__(self) -> Iterator[Tensor]:
        return self.make_iterator()


def _auto_cache_dir(data_cfg: Mapping[str, Any]) -> str:
    """`paths.cache_dir` of the config `data_cfg` belongs to (the default layout when it is detached)."""
    try:
        found = OmegaConf.select(data_cfg, "..paths.cache_dir") if isinstance(data_cfg, DictConfig) else None
    except ConfigKeyError:  # a detached section (the dashboard's): it has no parent to ask
        found = None
    return str(found) if found else "outputs/cache"


class ActivationDataModule(PositionedDataModule):
    """Training batches {hook: [batch, d]} for every hook of a group, all from one activation stream.

    Every hook sees the same tokens in the same order, the order a run on that hook alone would see: with the
    cache, one reader per hook drawing from identically seeded generators (every hook's cache holds the same
    windows in the same shards); streamed, one forward pass per model batch whose hooks' activations travel
    through the shuffle buffer side by side. Each hook has its own normalisation scale.
    """

    def __init__(self, data_cfg: Mapping[str, Any], model: LoadedModel, eval_tokens: int, seed: int,
                 cache_dir: str | None = None, train_tokens: int | None = None, hooks: list[str] | None = None,
                 *, source: DocumentSource):
        """`cache_dir` is where `data.cache=auto` keeps caches (default: the config's paths.cache_dir);
        `train_tokens` is the number of activations training will draw (default: data.train_tokens); `hooks`
        the hooks to serve (default: the model's first hook); `source` the documents' source (what data_cfg's
        `_target_` names: its TextSource.datamodule builds this). The data order comes from `data.seed`, else
        `seed`."""
        super().__init__()
        self.cfg, self.model, self.eval_tokens = data_cfg, model, int(eval_tokens)
        self.source = source
        data_seed = data_cfg.get("seed")
        self.seed = int(data_seed if data_seed is not None else seed)
        self.hooks = list(dict.fromkeys(hooks or model.hooks[:1]))
        self.special = SpecialTokens.from_tokenizer(model.tokenizer)
        self.train_tokens = int(float(train_tokens if train_tokens is not None else data_cfg["train_tokens"]))
        # Checked here, before any text is read, any forward pass runs or any directory is made.
        ctx = int(data_cfg["context_size"])
        if model.n_ctx is not None and ctx > model.n_ctx:
            raise ConfigError("data.context_size", ctx, f"at most the model's n_ctx ({model.n_ctx})")
        self.cache_store = cache_store(data_cfg.get("cache"), cache_dir or _auto_cache_dir(data_cfg))
        self.caches: dict[str, CacheReader] = {}  # per hook, when activations are read from the on-disk cache
        self.train_windows: Tensor | None = None  # not kept when activations come from the cache
        self.eval_windows: Tensor | None = None  # held-out token windows, in corpus order (spliced metrics)
        self.eval_acts: dict[str, Tensor] = {}  # normalised held-out activations per hook
        self.eval_firing: Tensor | None = None  # no world of true features behind text (data/protocol.py)
        self.scales: dict[str, float] = {}  # the normalisation scale C per hook
        self.input_rms: dict[str, float] = {}  # sqrt(E||x||^2) of the normalised activations (1 by default)
        self._head: Tensor | None = None  # the activations used to estimate the scales, trained on first
        self._ready = False
        self._resume_batches = 0  # batches this rank consumed before the checkpoint it resumes from

    @property
    def scale(self) -> float:
        """The first hook's scale (a run on one hook)."""
        return self.scales[self.hooks[0]]

    @property
    def cache(self) -> CacheReader | None:
        """The first hook's cache reader (a run on one hook), None when streaming."""
        return self.caches.get(self.hooks[0])

    # -- set-up -----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if self.cache_store is not None:
            self._setup_from_cache()
        else:
            self._setup_streaming()
        self._ready = True

    def windows(self, train: bool = True) -> dict[str, Tensor]:
        """The corpus as packed token windows: {"train": ..., "eval": ...} (disjoint by document); with
        train=False only the held-out ones (the training text, ~90% of it, is then not tokenized)."""
        cfg, ctx, tok = self.cfg, int(self.cfg["context_size"]), self.model.tokenizer
        docs = self.source.documents()
        if not docs:
            raise ConfigError("data.source", self.source.name, "a source with at least one document")
        train_docs, held_out_docs = split_documents(docs, float(cfg["eval_fraction"]))
        eval_windows = pack(tokenize(held_out_docs, tok), ctx, self.special, bool(cfg["prepend_bos"]))
        if not train:
            return {"eval": eval_windows}
        train_windows = pack(tokenize(train_docs, tok), ctx, self.special, bool(cfg["prepend_bos"]))
        if len(train_windows) == 0:
            raise ConfigError("data.path", cfg.get("path"), f"text with at least {ctx} training tokens")
        if len(eval_windows) == 0:
            raise ConfigError("data.eval_fraction", cfg["eval_fraction"],
                              "a fraction that leaves held-out text")
        log.info("corpus: %d train windows, %d held-out windows of %d tokens (%d documents)",
                 len(train_windows), len(eval_windows), ctx, len(docs))
        return {"train": train_windows, "eval": eval_windows}

    def _cache_request(self) -> Request:
        cfg = self.cfg
        # The budget plus one buffer fill, so the last batches do not repeat cached activations.
        train_tokens = self.train_tokens + int(cfg["buffer_tokens"])
        return Request(train_tokens, self.eval_tokens, str(cfg["normalize"]), int(cfg["normalize_tokens"]))

    def hook_caches(self) -> dict[str, ActivationCache]:
        """{hook: its cache} in data.cache's store, one per hook this datamodule serves."""
        assert self.cache_store is not None, "data.cache is off"
        keys = {hook: key_inputs(self.source, self.cfg, ModelSpec.of(self.model, hook), self.special)
                for hook in self.hooks}
        return {hook: ActivationCache(self.cache_store, keys[hook], self.model.d_model) for hook in self.hooks}

    def build_cache_share(self, index: int, count: int) -> int:
        """`saelab-cache build --shard index/count`: this worker's shards of every hook's cache (no manifest)."""
        return build_share(self.hook_caches(), self._cache_request(), self.windows(), self._generate, index, count)

    def finish_cache(self) -> list[str]:
        """`saelab-cache build --finish`: publish every hook's cache once all its shards are built."""
        caches = self.hook_caches()
        finish(caches, self._cache_request())
        return [cache.location for cache in caches.values()]

    def _setup_from_cache(self) -> None:
        cfg = self.cfg
        windows = functools.cache(self.windows)  # read the text at most once, and only if something is built
        self.caches = open_caches(self.hook_caches(), self._cache_request(), windows, self._generate)
        for hook, reader in self.caches.items():
            self.scales[hook], self.eval_windows = reader.scale, reader.eval_windows
            self.eval_acts[hook] = reader.eval_activations(self.eval_tokens) / reader.scale
            head = functools.partial(reader.head, int(cfg["normalize_tokens"]))  # read only if needed
            self.input_rms[hook] = normalised_rms(str(cfg["normalize"]), reader.scale, head)
            log.info("normalisation %s at %s: scale C = %.4g (from the cache's first %d activations); %d held-out "
                     "activations; %d cached train activations per epoch", cfg["normalize"], hook, reader.scale,
                     int(cfg["normalize_tokens"]), len(self.eval_acts[hook]), reader.train_tokens)

    def _setup_streaming(self) -> None:
        cfg = self.cfg
        self.prefetch_batches = self._prefetch_depth()  # checked before any text is read
        self._read_ahead: weakref.WeakSet[Prefetch] = weakref.WeakSet()  # live read-aheads, stopped by teardown
        windows = self.windows()
        self.train_windows, self.eval_windows = windows["train"], windows["eval"]
        # Held-out activations, kept in memory for evaluation only.
        raw_eval = self._split(collect(self._chunks(self.eval_windows, shuffle=False, epochs=1), self.eval_tokens))
        # The scales come from the first training activations; they are then trained on, not wasted.
        self._train_iter = self._chunks(self.train_windows, shuffle=True, epochs=None)
        self._head = collect(self._train_iter, int(cfg["normalize_tokens"]))
        for hook, head in self._split(self._head).items():
            self.scales[hook] = estimate_scale(head, str(cfg["normalize"]))
            self.input_rms[hook] = normalised_rms(str(cfg["normalize"]), self.scales[hook], head)
            self.eval_acts[hook] = raw_eval[hook] / self.scales[hook]
            log.info("normalisation %s at %s: scale C = %.4g (from %d activations); %d held-out activations",
                     cfg["normalize"], hook, self.scales[hook], len(head), len(self.eval_acts[hook]))

    def _split(self, rows: Tensor) -> dict[str, Tensor]:
        """Columns of side-by-side activations (activation_chunks with several hooks) -> {hook: rows}."""
        if len(self.hooks) == 1:
            return {self.hooks[0]: rows}
        # Every trained hook is d_model wide (train.py checks sae.d_in against it).
        return dict(zip(self.hooks, rows.split(self.model.d_model, dim=1), strict=True))

    def _generate(self, windows: Tensor, hooks: list[str]) -> Iterator[dict[str, Tensor]]:
        """Activations of windows in their order at every hook given, one forward pass per model batch (the
        caches of several hooks are filled together)."""
        names = list(hooks)
        chunks = activation_chunks(self.model, windows, self.special, int(self.cfg["model_batch_size"]), hooks=names)
        widths = [self.model.d_model] * len(names)  # every cached hook is d_model wide (checked by run/stream.py)
        for chunk in chunks:
            yield dict(zip(names, chunk.split(widths, dim=1), strict=True))

    def _chunks(self, windows: Tensor, shuffle: bool, epochs: int | None) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return activation_chunks(self.model, windows, self.special, int(self.cfg["model_batch_size"]),
                                 generator=generator, epochs=epochs, hooks=self.hooks)

    def _prefetch_depth(self) -> int:
        """data.prefetch_batches: model batches computed ahead in a thread (0: inline). A data section built by
        hand (tests, tools) may leave it out: off."""
        depth = self.cfg.get("prefetch_batches", 0)
        check_positive("data.prefetch_batches", depth, allow_zero=True, integer=True)
        return int(depth)

    @contextlib.contextmanager
    def _ahead(self, chunks: Iterator[Tensor]) -> Iterator[Iterator[Tensor]]:
        """`chunks` with the model's next data.prefetch_batches forwards running in a thread while the SAEs step
        (saelab.data.prefetch: same chunks, same order); the thread stops when the block exits."""
        if not self.prefetch_batches:
            yield chunks
            return
        # One read-ahead at a time: two threads must not run the one model at once (nor, on one rank, both draw
        # from the one shared chunk iterator), so a new stream stops the previous one's thread.
        self.teardown()
        with Prefetch(chunks, self.prefetch_batches) as ahead:
            self._read_ahead.add(ahead)
            yield ahead

    def teardown(self, stage: str | None = None) -> None:
        """Stop the stream's read-ahead (Lightning calls this when fit ends, before the end-of-run evaluation runs
        the model with splice hooks): no forward is left running in the background."""
        for ahead in list(getattr(self, "_read_ahead", ())):
            ahead.close()

    # -- loaders --------------------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def train_batches(self) -> Iterator[dict[str, Tensor]]:
        """This rank's training batches, from the data position of the checkpoint being resumed (if any)."""
        stream = self._rank_batches(*self._rank_and_world())
        skip, self._resume_batches = self._resume_batches, 0
        if skip:
            log.info("resuming the activation stream after %d batches", skip)
        return itertools.islice(stream, skip, None)

    def _rank_batches(self, rank: int, world: int) -> Iterator[dict[str, Tensor]]:
        """Batches for one of `world` ranks; the ranks' batches are disjoint and together make the whole stream.

        Cached activations: every rank draws the same global stream and keeps every world-th batch (reads are
        cheap). Generated activations: each rank runs the model on its own share of the training windows.
        """
        batch_size, buffer_tokens = int(self.cfg["batch_size"]), int(self.cfg["buffer_tokens"])
        if self.caches:  # permuted groups of buffer_tokens cached activations: no shuffle buffer
            streams = [reader.batches(torch.Generator().manual_seed(self.seed), batch_size, buffer_tokens,
                                      self.scales[hook]) for hook, reader in self.caches.items()]
            for batches in itertools.islice(zip(*streams, strict=False), rank, None, world):
                yield dict(zip(self.caches, batches, strict=True))
            return
        if world == 1:  # the activations that set the scale are trained on first, not wasted
            head, self._head = self._head, None
            chunks = itertools.chain([head] if head is not None else [], self._train_iter)
        else:
            chunks = self._chunks(self.train_windows[rank::world], shuffle=True, epochs=None)
        generator = torch.Generator().manual_seed(self.seed + 1 + rank)
        with self._ahead(chunks) as chunks:  # closed when the stream stops or is dropped
            for batch in ShuffleBuffer(chunks, buffer_tokens, batch_size, generator):
                yield {hook: rows / self.scales[hook] for hook, rows in self._split(batch).items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Batches(self.train_batches), batch_size=None, num_workers=0)
