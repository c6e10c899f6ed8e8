"""On-disk activation cache: a sweep runs the language model once; every job then reads activations from disk.

One cache is a directory `<root>/<name>/`, where `name` is `<model>--<hook>--<key>`:

    manifest.json        written last: a directory without it is an interrupted build and is never read
    train-00000.npy ...  float32 [rows, d_model] shards; shard i holds windows [i*W, (i+1)*W) of the train
                         stream, which is every train window once, in a fixed seeded order
    eval-00000.npy ...   the held-out activations in corpus order (the ones the uncached stream evaluates on)
    eval-windows.npy     the held-out token windows (int32), for spliced metrics

Choices, and why:

- Key. A sha256 of everything that decides the activations: model name, the model directory's files
  (contents of files up to 1 MB -- configs, tokenizer -- and size + mtime of larger ones, so multi-GB weights
  cost no read; rewriting weights changes their mtime, and a copy elsewhere only costs a new cache), model
  dtype, TransformerLens version, hook, the text source (pydocs: the Python build; text_files: the path and
  the files, by the same fingerprint; hf: path, split, columns, max_documents, plus the files of a local
  dataset directory), context size, prepend_bos, the excluded special-token ids, eval_fraction and the
  saelab source files that turn text into activations. The key needs no documents, so a reused cache loads
  no text and runs no forward. Not detected: a new revision of a hub *dataset* under the same name (delete
  the cache or point data.cache elsewhere). `model_batch_size` and the device are left out: they change
  activations only at rounding level.
- Budget. Not in the key. The train stream is one pass over the train windows in a fixed order (seed
  TRAIN_ORDER_SEED, not the run's seed, so every seed of a sweep shares it); a run reads the shortest prefix
  of whole shards holding its budget (train_tokens + buffer_tokens) and cycles over it, reshuffled each
  epoch, as the uncached stream cycles over the corpus. A run that needs more than is cached extends the
  cache in place (new shards, then a new manifest); runs reading the old manifest are unaffected. So a
  small-budget run never pays for a whole large corpus, and a run's data does not depend on how far others
  have grown the cache.
- Reading. Shards in a random order, grouped up to buffer_tokens rows, each group permuted as a whole. Every
  shard is a random sample of windows, so this mixes like the shuffle buffer at a fraction of its copying.
- float32. Lossless for every model dtype (the stream is float32 anyway); float16 would round float32 models.
- Integrity. Each file is written atomically and its size and sha256 (~1.7 GB/s here) go in the manifest;
  a first build happens in a temp directory renamed into place. Before reading, every file the run will
  read is checked; any problem (missing manifest, bad JSON, size or checksum mismatch) logs one warning and
  the cache is rebuilt.
- Concurrency. Checking, building and extending happen under `<root>/<name>.lock` (filelock, released if the
  process dies; needs a filesystem with working flock): one job builds, the others wait, then all read. A
  reader memory-maps its shards before it releases the lock, so a later rebuild cannot pull them away.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor

from saelab.data.cache_key import FORMAT, TRAIN_ORDER_SEED, cache_name, file_sha256
from saelab.data.cache_manifest import (
    MANIFEST,
    STREAMS,
    Request,
    file_problem,
    manifest_bytes,
    read_manifest,
    select,
    tokens,
)
from saelab.data.normalize import estimate_scale
from saelab.io import atomic_write, write_json

log = logging.getLogger(__name__)

# A shard holds W windows: at most SHARD_BYTES (sequential reads, bounded memory while permuting it) and at
# most SHARD_TOKENS activations (budgets round up to whole shards; more shards = better shuffled epochs).
SHARD_BYTES = 64 * 2**20
SHARD_TOKENS = 2**15

Windows = dict[str, Tensor]  # {"train": [n, ctx], "eval": [m, ctx]} token windows
ActivationsFn = Callable[[Tensor], Iterator[Tensor]]  # windows -> float32 [rows, d] chunks


# -- the cache -----------------------------------------------------------------------------------------------
class ActivationCache:
    """One cache directory: check it, build or extend it under a lock, and hand out a reader."""

    def __init__(self, root: Path, inputs: Mapping[str, Any], d_model: int, shard_windows: int | None = None):
        """`shard_windows` is for tests; by default it follows from SHARD_BYTES and SHARD_TOKENS."""
        self.root, self.inputs, self.d_model = Path(root), dict(inputs), int(d_model)
        self.shard_windows = shard_windows
        self.name = cache_name(self.inputs)
        self.path = self.root / self.name
        self.shards_written = 0  # by this process; a reused cache leaves it at 0

    def open(self, request: Request, windows: Callable[[], Windows], activations: ActivationsFn
             ) -> CacheReader:
        """Make sure the cache holds what `request` reads (building it if needed) and return a reader.

        `windows()` is called only when activations must be generated: a reused cache loads no text.
        """
        with self._locked():
            manifest = self._usable_manifest(request)
            if manifest is not None and all(select(manifest["streams"][s], request.needs(s)) is not None
                                            for s in STREAMS):
                log.info("activation cache: reusing %s (%d train + %d held-out activations; no forward)",
                         self.path, tokens(manifest, "train"), tokens(manifest, "eval"))
            else:
                manifest = self._generate(manifest, request, windows(), activations)
            if request.scale_key not in manifest["scales"]:
                head = _read_rows(self.path, select(manifest["streams"]["train"], request.normalize_tokens),
                                  request.normalize_tokens)
                manifest["scales"][request.scale_key] = estimate_scale(head, request.normalize)
                write_json(self.path / MANIFEST, manifest)
            return CacheReader(self.path, manifest, request)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = FileLock(str(self.root / f"{self.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("activation cache: waiting for another job to finish with %s", self.path)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _usable_manifest(self, request: Request) -> dict[str, Any] | None:
        """The manifest if every shard this run would read is intact; otherwise discard the cache."""
        manifest, problem = read_manifest(self.path)
        if manifest is not None and manifest.get("inputs") != self.inputs:
            problem = "manifest.json records different key inputs"
        if problem is None and manifest is not None:
            problem = file_problem(self.path, manifest["eval_windows"])
            for stream in STREAMS:
                spec = manifest["streams"][stream]
                for shard in select(spec, request.needs(stream)) or spec["shards"]:
                    problem = problem or file_problem(self.path, shard)
        if problem is not None:
            log.warning("activation cache %s is unusable (%s); rebuilding it", self.path, problem)
            shutil.rmtree(self.path, ignore_errors=True)
            return None
        return manifest

    def _generate(self, manifest: dict[str, Any] | None, request: Request, windows: Windows,
                  activations: ActivationsFn) -> dict[str, Any]:
        """Build a new cache in a temp directory, or extend this one in place, until `request` is covered."""
        generator = torch.Generator().manual_seed(TRAIN_ORDER_SEED)
        order = torch.randperm(len(windows["train"]), generator=generator)
        ordered = {"train": windows["train"][order], "eval": windows["eval"]}
        digests = {s: hashlib.sha256(ordered[s].numpy().tobytes()).hexdigest() for s in STREAMS}
        if manifest is not None and any(manifest["streams"][s]["windows_sha256"] != digests[s]
                                        for s in STREAMS):
            log.warning("activation cache %s is unusable (its token windows differ from the corpus's now); "
                        "rebuilding it", self.path)
            shutil.rmtree(self.path, ignore_errors=True)
            manifest = None
        fresh = manifest is None
        if fresh:
            for stale in self.root.glob(f".{self.name}.building-*"):  # a killed build's; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            work = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{self.name}.building-"))
            manifest = self._new_manifest(ordered, digests)
            # The held-out token windows too (int32, small): spliced metrics run the model on them.
            manifest["eval_windows"] = _write_array(work / "eval-windows.npy", ordered["eval"].int().numpy())
        else:
            work = self.path
        log.info("activation cache: %s %s (train pass: %d windows, held-out: %d windows, %d windows a shard)",
                 "building" if fresh else "extending", self.path, len(ordered["train"]), len(ordered["eval"]),
                 manifest["shard_windows"])
        for stream in STREAMS:
            spec = manifest["streams"][stream]
            while select(spec, request.needs(stream)) is None:
                self._write_shard(work, stream, spec, ordered[stream], activations, manifest)
        manifest["updated"] = _now()
        write_json(work / MANIFEST, manifest)
        if fresh:
            os.replace(work, self.path)
        log.info("activation cache: %s holds %d train + %d held-out activations (%.1f MB)", self.path,
                 tokens(manifest, "train"), tokens(manifest, "eval"), manifest_bytes(manifest) / 2**20)
        return manifest

    def _new_manifest(self, ordered: Windows, digests: dict[str, str]) -> dict[str, Any]:
        ctx = int(ordered["train"].shape[1])
        return {
            "format": FORMAT, "name": self.name, "inputs": self.inputs, "dtype": "float32",
            "d_model": self.d_model,
            "context_size": ctx, "shard_windows": self._shard_windows(ctx),
            "created": _now(), "scales": {},
            "streams": {s: {"windows": len(ordered[s]), "windows_sha256": digests[s], "complete": False,
                            "shards": []} for s in STREAMS},
        }

    def _shard_windows(self, ctx: int) -> int:
        return self.shard_windows or max(1, min(SHARD_BYTES // (ctx * self.d_model * 4), SHARD_TOKENS // ctx))

    def _write_shard(self, work: Path, stream: str, spec: dict[str, Any], ordered: Tensor,
                     activations: ActivationsFn, manifest: dict[str, Any]) -> None:
        index, w = len(spec["shards"]), manifest["shard_windows"]  # extensions keep the first build's W
        chunk = ordered[index * w : (index + 1) * w]
        acts = torch.cat(list(activations(chunk))) if len(chunk) else torch.empty(0, manifest["d_model"])
        spec["shards"].append(_write_array(work / f"{stream}-{index:05d}.npy", acts.float().numpy()))
        spec["complete"] = (index + 1) * w >= len(ordered)
        self.shards_written += 1


def _write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write an .npy atomically; return its manifest entry (rows, size and sha256, checked before reads)."""
    array = np.ascontiguousarray(array)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, save)
    return {"file": path.name, "rows": len(array), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


class CacheReader:
    """The shards one run reads, memory-mapped up front; streams shuffled batches of train activations."""

    def __init__(self, directory: Path, manifest: Mapping[str, Any], request: Request):
        self.path, self.manifest = directory, manifest
        self.scale = float(manifest["scales"][request.scale_key])
        train = select(manifest["streams"]["train"], request.needs("train"))
        held_out = select(manifest["streams"]["eval"], request.eval_tokens)
        self.train = [np.load(directory / s["file"], mmap_mode="r") for s in train]
        self.eval = [np.load(directory / s["file"], mmap_mode="r") for s in held_out]
        # Every held-out window, in corpus order: the tokens the held-out activations came from.
        self.eval_windows = torch.from_numpy(np.load(directory / manifest["eval_windows"]["file"])).long()

    @property
    def train_tokens(self) -> int:
        return sum(len(shard) for shard in self.train)

    def eval_activations(self, n_tokens: int) -> Tensor:
        """The first n_tokens held-out activations in corpus order (fewer if the held-out text is short)."""
        return take_rows(self.eval, n_tokens)

    def epoch(self, generator: torch.Generator, group_tokens: int = 0, scale: float = 1.0) -> Iterator[Tensor]:
        """Every train activation read by this run exactly once, as permuted groups of shards.

        Shards come in a random order; consecutive shards are grouped until a group holds `group_tokens`
        rows, and each group is permuted as a whole. Every shard is a random sample of the corpus's windows,
        so a group mixes as well as a shuffle buffer of that size, at a fraction of its copying. Rows are
        divided by `scale` once per group, not once per batch.

        Reading and permuting a group (~0.1-0.2 s for 64k rows of 384) runs in a background thread while
        training consumes the previous group: numpy releases the GIL there, and a batch no longer waits for
        it (that wait was ~8% of a TopK step). The random draws happen here, in order, so the stream is the
        same as without the thread.
        """
        order = torch.randperm(len(self.train), generator=generator).tolist()
        groups: list[list[np.ndarray]] = []
        while order:
            groups.append([self.train[order.pop(0)]])
            while order and sum(len(shard) for shard in groups[-1]) < group_tokens:
                groups[-1].append(self.train[order.pop(0)])
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saelab-cache-read") as reader:
            ahead = None
            for group in groups:
                permutation = torch.randperm(sum(len(shard) for shard in group), generator=generator).numpy()
                loading = reader.submit(_permuted_rows, group, permutation)
                if ahead is not None:
                    yield _scaled(ahead.result(), scale)
                ahead = loading
            if ahead is not None:
                yield _scaled(ahead.result(), scale)

    def batches(self, generator: torch.Generator, batch_size: int, group_tokens: int, scale: float = 1.0
                ) -> Iterator[Tensor]:
        """Training batches (rows / scale) forever, epoch after epoch, reshuffled each time, as uncached."""
        pending = torch.empty(0, self.manifest["d_model"])
        while self.train_tokens:
            for rows in self.epoch(generator, group_tokens, scale):
                if len(pending):  # complete the batch the last group left unfinished
                    head, rows = rows[: batch_size - len(pending)], rows[batch_size - len(pending) :]
                    pending = torch.cat([pending, head])
                    if len(pending) < batch_size:
                        continue
                    yield pending
                n_full = len(rows) // batch_size * batch_size
                yield from rows[:n_full].split(batch_size)
                pending = rows[n_full:]


def _permuted_rows(shards: list[np.ndarray], permutation: np.ndarray) -> Tensor:
    """The shards' rows (read from the page cache / disk), in the order `permutation` gives."""
    return torch.from_numpy(np.take(np.concatenate(shards), permutation, axis=0))


def _scaled(rows: Tensor, scale: float) -> Tensor:
    return rows.div_(scale) if scale != 1.0 else rows


def take_rows(shards: list[np.ndarray], n_tokens: int) -> Tensor:
    taken, have = [], 0
    for shard in shards:
        if have >= n_tokens:
            break
        taken.append(torch.from_numpy(np.array(shard[: n_tokens - have])))
        have += len(taken[-1])
    return torch.cat(taken) if taken else torch.empty(0)


def _read_rows(directory: Path, shards: list[dict[str, Any]], n_tokens: int) -> Tensor:
    return take_rows([np.load(directory / s["file"], mmap_mode="r") for s in shards], n_tokens)




def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


