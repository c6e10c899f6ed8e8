"""Activation cache: a sweep runs the language model once; every job then reads activations from the cache.

A cache lives in a store (saelab.data.cache_store: a local directory or any fsspec URL, e.g. s3://bucket/prefix)
under `<name>/`, where `name` is `<model>--<hook>--<key>`:

    manifest.json        written last: a cache without it is a build not finished and is never read
    plan.json            the pass every builder derives from the token windows alone: windows, digests, rows a shard
    train-windows.npy    the train stream's token windows (int32), in stored order
    eval-windows.npy     the held-out token windows (int32), in corpus order (for spliced metrics)
    train-00000.npy ...  [rows, d_model] shards in data.cache_dtype (bfloat16 as its raw 16 bits, uint16); shard i
                         holds windows [i*W, (i+1)*W) of the train stream, which is every train window once, in a
                         fixed seeded order; its rows are the windows' non-special positions, window by window
    eval-00000.npy ...   the held-out activations in corpus order (the ones the uncached stream evaluates on)
    parts/<shard>.json   one per finished shard (rows, bytes, sha256): what a finishing step publishes

Choices, and why:

- Key. A sha256 of everything that decides the activations: model name, the model directory's files
  (contents of files up to 1 MB -- configs, tokenizer -- and size + mtime of larger ones, so multi-GB weights
  cost no read; rewriting weights changes their mtime, and a copy elsewhere only costs a new cache), model
  dtype, TransformerLens version, hook, the storage dtype, the text source (pydocs: the Python build;
  text_files: the path and the files, by the same fingerprint; hf: path, split, columns, max_documents, plus the
  files of a local dataset directory), context size, prepend_bos, the excluded special-token ids, eval_fraction
  and the saelab source files that turn text into activations. The key needs no documents, so a reused cache
  loads no text and runs no forward. Not detected: a new revision of a hub *dataset* under the same name
  (delete the cache or point data.cache elsewhere). `model_batch_size` and the device are left out: they
  change activations only at rounding level.
- Storage dtype (data.cache_dtype). float32 is lossless for every model dtype; bfloat16 and float16 halve the
  bytes stored and read (docs/RESULTS.md measures what bfloat16 costs a trained SAE). The stream into the SAE is
  float32 either way: rows are widened as they are read.
- Budget. Not in the key. The train stream is one pass over the train windows in a fixed order (seed
  TRAIN_ORDER_SEED, not the run's seed, so every seed of a sweep shares it); a run reads the shortest prefix
  of whole shards holding its budget (train_tokens + buffer_tokens) and cycles over it, reshuffled each
  epoch, as the uncached stream cycles over the corpus. A run that needs more than is cached extends the
  cache (new shards, then a new manifest); runs reading the old manifest are unaffected.
- Many builders. Which windows shard i holds, and how many rows it has (its non-special positions), follow
  from the token windows alone, so N workers (`saelab-cache build --shard I/N`) each write their own shards with
  no coordination, each finished shard followed by its part file; a finishing step (`--finish`) checks every
  part and publishes the manifest. A single process does the same with N = 1. Every shard's bytes are the same
  whoever builds it, and a killed build keeps the shards it finished.
- Several hooks. One forward pass fills the shards of every hook a group reads (one cache per hook).
- Reading. Shards in a random order, grouped up to buffer_tokens rows, each group permuted as a whole. Every
  shard is a random sample of windows, so this mixes like the shuffle buffer at a fraction of its copying.
  Groups are fetched and permuted READ_AHEAD groups ahead in background threads (remote shards concurrently);
  memory holds at most that many groups, whatever the cache's size.
- Integrity. Every file's size and sha256 go in its part and the manifest. Locally, every file a run will read
  is checked before training and a damaged cache is rebuilt (one warning). In an object store the sizes are
  checked before training (one listing) and each shard's sha256 as it is fetched, before any row of it is
  used; a damaged remote cache is an error, never rebuilt under other readers.
- Concurrency. Checking, building and extending happen under the store's lock for the cache (a flock locally,
  a lease object in an object store; see cache_store): one job builds, the others wait, then all read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.data.cache_key import FORMAT, TRAIN_ORDER_SEED, cache_name
from saelab.data.cache_manifest import (
    MANIFEST,
    PARTS,
    PLAN,
    STORED_DTYPES,
    STREAMS,
    Request,
    all_files,
    bytes_sha256,
    file_problem,
    manifest_bytes,
    read_manifest,
    select,
    shards_needed,
    tokens,
)
from saelab.data.cache_store import CacheBusy, Lease, Store, npy_bytes
from saelab.data.normalize import estimate_scale
from saelab.errors import ConfigError

log = logging.getLogger(__name__)

# A shard holds W windows: at most SHARD_BYTES (sequential reads, bounded memory while permuting it) and at
# most SHARD_TOKENS activations (budgets round up to whole shards; more shards = better shuffled epochs).
SHARD_BYTES = 64 * 2**20
SHARD_TOKENS = 2**15
READ_AHEAD = 2  # groups fetched and permuted ahead of the one training consumes
FETCH_THREADS = 4  # concurrent shard fetches (an object store serves parallel GETs faster than one)

Windows = dict[str, Tensor]  # {"train": [n, ctx], "eval": [m, ctx]} token windows
# (windows, hooks) -> chunks {hook: float32 [rows, d]}: one forward pass serves every hook
ActivationsFn = Callable[[Tensor, list[str]], Iterator[dict[str, Tensor]]]


# -- storage dtype -------------------------------------------------------------------------------------------
def encode(rows: Tensor, dtype: str) -> np.ndarray:
    """float32 rows as stored: float32, float16, or bfloat16's 16 bits as uint16 (numpy has no bfloat16)."""
    if dtype == "bfloat16":
        return rows.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return rows.to(getattr(torch, dtype)).numpy()


def decode(stored: np.ndarray, dtype: str) -> Tensor:
    """Stored rows as float32 (never a view of a memory map or a fetched buffer: callers scale rows in place)."""
    if dtype == "bfloat16":  # bfloat16 is float32's top 16 bits: shifting them back up is the exact widening
        widened = np.empty(stored.shape, dtype=np.uint32)  # (numpy's shift is ~2x torch's bfloat16 cast here)
        np.left_shift(stored, 16, out=widened, dtype=np.uint32)
        return torch.from_numpy(widened.view(np.float32))
    array = stored if stored.flags.owndata and stored.flags.writeable else np.array(stored)
    tensor = torch.from_numpy(array)
    return tensor if dtype == "float32" else tensor.float()


def stored_dtype(value: Any) -> str:
    """data.cache_dtype, refused in one line when unknown."""
    if value not in STORED_DTYPES:
        raise ConfigError("data.cache_dtype", value, tuple(STORED_DTYPES))
    return str(value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _shard_file(stream: str, index: int) -> str:
    return f"{stream}-{index:05d}.npy"


# -- one cache -----------------------------------------------------------------------------------------------
class ActivationCache:
    """One cache (one hook's activations of one corpus through one model) in a store."""

    def __init__(self, store: Store | str | Path, inputs: Mapping[str, Any], d_model: int,
                 shard_windows: int | None = None):
        """`shard_windows` is for tests; by default it follows from SHARD_BYTES and SHARD_TOKENS."""
        self.store = store if isinstance(store, Store) else Store(store)
        self.inputs, self.d_model = dict(inputs), int(d_model)
        self.dtype = stored_dtype(self.inputs.get("cache_dtype", "float32"))
        self.excluded = sorted(self.inputs.get("special_tokens", {}).get("excluded", []))
        self.shard_windows = shard_windows
        self.name = cache_name(self.inputs)
        self.files = self.store.child(self.name)
        self.location = self.store.where(self.name)
        self.path = self.store.local_path(self.name) if self.store.local else None  # local caches only
        self.shards_written = 0  # by this process; a reused cache leaves it at 0

    @property
    def hook(self) -> str:
        return str(self.inputs["hook"])

    def window_count(self, ctx: int) -> int:
        """W, the windows a shard holds."""
        per_window = ctx * self.d_model * STORED_DTYPES[self.dtype]
        return self.shard_windows or max(1, min(SHARD_BYTES // per_window, SHARD_TOKENS // ctx))

    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[Lease | None]:
        try:
            with self.store.lock(self.name, wait=False) as lease:
                yield lease
                return
        except CacheBusy:
            if not wait:
                raise
        log.info("activation cache: waiting for another job to finish with %s", self.location)
        with self.store.lock(self.name, wait=True) as lease:
            yield lease

    # -- the manifest ------------------------------------------------------------------------------------
    def usable_manifest(self, request: Request | None) -> dict[str, Any] | None:
        """The manifest if every file this run would read is intact. Locally a damaged cache is removed (and
        rebuilt); in an object store it is a one-line error (others may be reading it)."""
        manifest, problem = read_manifest(self.files)
        if manifest is None and not self.files.exists(MANIFEST):
            return None  # nothing, or a build not finished: its finished shards are kept and the rest built
        if manifest is not None and manifest.get("inputs") != self.inputs:
            problem = "manifest.json records different key inputs"
        if problem is None and manifest is not None:
            sizes = self.files.sizes()
            for entry in self._files_read(manifest, request):
                problem = problem or file_problem(self.files, entry, sizes, checksum=self.store.local)
        if problem is None:
            return manifest
        if not self.store.local:
            raise ConfigError("data.cache", self.store.url,
                              f"an intact cache ({self.location}: {problem}; delete that cache to rebuild it, "
                              "or point data.cache elsewhere)")
        log.warning("activation cache %s is unusable (%s); rebuilding it", self.location, problem)
        self.files.remove("")
        return None

    def _files_read(self, manifest: Mapping[str, Any], request: Request | None) -> list[dict[str, Any]]:
        files = list(manifest["windows"].values())
        for stream in STREAMS:
            spec = manifest["streams"][stream]
            chosen = select(spec, request.needs(stream)) if request is not None else None
            files += chosen or spec["shards"]
        return files

    def covers(self, manifest: Mapping[str, Any] | None, request: Request) -> bool:
        return manifest is not None and all(select(manifest["streams"][s], request.needs(s)) is not None
                                            for s in STREAMS)

    # -- building ----------------------------------------------------------------------------------------
    def plan_differs(self, plan: Plan) -> bool:
        """Whether this cache records another pass than `plan` (the corpus or the shard size changed)."""
        try:
            return self.files.read_json(PLAN) != plan.record(self.window_count(plan.context_size), self.excluded)
        except FileNotFoundError:
            return False

    def write_plan(self, plan: Plan) -> None:
        """Record the pass (idempotent: every builder derives the same plan) and write the token windows."""
        if self.plan_differs(plan):
            raise ConfigError("data.cache", self.store.url,
                              f"a cache whose plan matches this corpus ({self.files.where(PLAN)} records another "
                              "pass: the corpus or the shard size changed; delete that cache to rebuild it)")
        if not self.files.exists(PLAN):
            for stream in STREAMS:
                self.files.write_bytes(f"{stream}-windows.npy", plan.windows_bytes[stream])
            self.files.write_json(PLAN, plan.record(self.window_count(plan.context_size), self.excluded))

    def finished(self) -> set[str]:
        """The shard files that are finished: their part is written (after the shard) and the file is there.
        Two listings, whatever the cache's size: a resumed worker skips its finished shards without reading them."""
        files = self.files.sizes()
        return {name.removesuffix(".json") for name in self.files.sizes(PARTS)} & set(files)

    def parts(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """{shard file: its part} for the finished ones among `names`, fetched concurrently (a finishing step of a
        large remote cache reads many small objects); a part whose shard has another size is left out."""
        sizes = self.files.sizes()
        wanted = [n for n in names if n in self.finished()]
        blobs = self.files.fs.cat([self.files._path(f"{PARTS}/{n}.json") for n in wanted]) if wanted else {}
        found = {}
        for blob in blobs.values():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                part = json.loads(blob)
                if sizes.get(part["file"]) == part["bytes"]:
                    found[part["file"]] = part
        return found

    def write_shard(self, stream: str, index: int, rows: Tensor, windows_sha256: str) -> None:
        blob = npy_bytes(encode(rows.float(), self.dtype))
        entry = {"file": _shard_file(stream, index), "rows": len(rows), "bytes": len(blob),
                 "sha256": bytes_sha256(blob), "windows_sha256": windows_sha256}
        self.files.write_bytes(entry["file"], blob)
        self.files.write_json(f"{PARTS}/{_shard_file(stream, index)}.json", entry)
        self.shards_written += 1

    def publish(self, request: Request, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        """Write the manifest covering `request` from the finished parts; ConfigError naming what is missing."""
        plan = self.files.read_json(PLAN)
        counts = {s: shards_needed(plan["streams"][s]["rows"], request.needs(s)) for s in STREAMS}
        parts = self.parts([_shard_file(s, i) for s in STREAMS for i in range(counts[s])])
        streams, missing = {}, []
        for stream in STREAMS:
            spec = plan["streams"][stream]
            count = counts[stream]
            shards = []
            for index in range(count):
                part = parts.get(_shard_file(stream, index))
                if part is None or part["windows_sha256"] != spec["windows_sha256"]:
                    missing.append(_shard_file(stream, index))
                else:
                    shards.append({k: part[k] for k in ("file", "rows", "bytes", "sha256")})
            streams[stream] = {"windows": spec["windows"], "windows_sha256": spec["windows_sha256"],
                               "complete": count == len(spec["rows"]), "shards": shards}
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ConfigError("--finish", self.location, f"a cache whose shards are all built ({len(missing)} not "
                              f"yet: {shown}; run the builders that own them first)")
        manifest = {
            "format": FORMAT, "name": self.name, "inputs": self.inputs, "dtype": self.dtype,
            "d_model": self.d_model, "context_size": plan["context_size"], "shard_windows": plan["shard_windows"],
            "created": (previous or {}).get("created", _now()), "updated": _now(),
            "scales": dict((previous or {}).get("scales", {})), "windows": plan["windows_files"],
            "streams": streams,
        }
        self.files.write_json(MANIFEST, manifest)
        log.info("activation cache: %s holds %d train + %d held-out activations (%s, %.1f MB)", self.location,
                 tokens(manifest, "train"), tokens(manifest, "eval"), self.dtype, manifest_bytes(manifest) / 2**20)
        return manifest

    def with_scale(self, manifest: dict[str, Any], request: Request) -> dict[str, Any]:
        """The manifest holding the normalisation scale `request` wants (computed and written once)."""
        if request.scale_key not in manifest["scales"]:
            head = take_rows(self.shards(select(manifest["streams"]["train"], request.normalize_tokens) or []),
                             request.normalize_tokens)
            manifest["scales"][request.scale_key] = estimate_scale(head, request.normalize)
            self.files.write_json(MANIFEST, manifest)
        return manifest

    def shards(self, entries: list[dict[str, Any]]) -> list[Shard]:
        return [Shard(self.files, entry, self.dtype, self.d_model, verify=not self.store.local) for entry in entries]


# -- the pass every builder derives --------------------------------------------------------------------------
class Plan:
    """The train stream's order, each stream's windows and digests: the same in every builder."""

    def __init__(self, windows: Windows):
        generator = torch.Generator().manual_seed(TRAIN_ORDER_SEED)
        order = torch.randperm(len(windows["train"]), generator=generator)
        self.ordered = {"train": windows["train"][order], "eval": windows["eval"]}
        self.context_size = int(self.ordered["train"].shape[1])
        self.digests = {s: bytes_sha256(self.ordered[s].numpy().tobytes()) for s in STREAMS}
        self.windows_bytes = {s: npy_bytes(self.ordered[s].int().numpy()) for s in STREAMS}

    def rows(self, stream: str, w: int, excluded: list[int]) -> list[int]:
        """Rows of each shard of `stream`'s whole pass: its windows' non-excluded positions."""
        windows = self.ordered[stream]
        kept = (~torch.isin(windows, torch.tensor(excluded, dtype=windows.dtype))).sum(1) if excluded else \
            torch.full((len(windows),), windows.shape[1])
        return [int(kept[i : i + w].sum()) for i in range(0, len(windows), w)]

    def record(self, w: int, excluded: list[int]) -> dict[str, Any]:
        return {"context_size": self.context_size, "shard_windows": w,
                "windows_files": {s: {"file": f"{s}-windows.npy", "rows": len(self.ordered[s]),
                                      "bytes": len(self.windows_bytes[s]),
                                      "sha256": bytes_sha256(self.windows_bytes[s])} for s in STREAMS},
                "streams": {s: {"windows": len(self.ordered[s]), "windows_sha256": self.digests[s],
                                "rows": self.rows(s, w, excluded)} for s in STREAMS}}


def _build(caches: list[ActivationCache], plan: Plan, request: Request, activations: ActivationsFn,
           share: tuple[int, int] = (0, 1), leases: list[Lease | None] | None = None) -> None:
    """Write this builder's share of the shards `request` needs, for every cache at once: one forward pass per
    shard serves every hook missing it. Caches are grouped by W (the hooks' widths may differ)."""
    by_w: dict[int, list[ActivationCache]] = {}
    for cache in caches:
        cache.write_plan(plan)
        by_w.setdefault(cache.window_count(plan.context_size), []).append(cache)
    for w, group in by_w.items():
        done = {cache.name: cache.finished() for cache in group}
        items = []
        for stream in STREAMS:
            rows = plan.rows(stream, w, group[0].excluded)
            items += [(stream, i) for i in range(shards_needed(rows, request.needs(stream)))]
        mine = items[share[0] :: share[1]]
        log.info("activation cache: writing %d of %d shards of %s (W = %d windows a shard)", len(mine),
                 len(items), ", ".join(c.location for c in group), w)
        for stream, index in mine:
            todo = [c for c in group if _shard_file(stream, index) not in done[c.name]]
            if not todo:
                continue
            chunk = plan.ordered[stream][index * w : (index + 1) * w]
            hooks = [c.hook for c in todo]
            pieces = list(activations(chunk, hooks)) if len(chunk) else []
            for cache in todo:
                rows = torch.cat([p[cache.hook] for p in pieces]) if pieces else torch.empty(0, cache.d_model)
                cache.write_shard(stream, index, rows, plan.digests[stream])
            for lease in leases or []:
                if lease is not None:
                    lease.renew()


def open_caches(caches: Mapping[str, ActivationCache], request: Request, windows: Callable[[], Windows],
                activations: ActivationsFn) -> dict[str, CacheReader]:
    """Make sure every hook's cache holds what `request` reads (building the missing shards of all of them with
    one forward pass per shard) and return a reader per hook. `windows()` is called only when activations must
    be generated: reused caches load no text."""
    ordered = sorted(caches.values(), key=lambda c: c.name)
    with contextlib.ExitStack() as stack:
        leases = [stack.enter_context(cache.locked()) for cache in ordered]
        manifests = {c.name: c.usable_manifest(request) for c in ordered}
        todo = [c for c in ordered if not c.covers(manifests[c.name], request)]
        for cache in ordered:
            if cache not in todo:
                log.info("activation cache: reusing %s (%d train + %d held-out activations; no forward)",
                         cache.location, tokens(manifests[cache.name], "train"), tokens(manifests[cache.name], "eval"))
        if todo:
            plan = Plan(windows())
            for cache in todo:
                if cache.store.local and cache.plan_differs(plan):
                    log.warning("activation cache %s is unusable (its token windows differ from the corpus's now); "
                                "rebuilding it", cache.location)
                    cache.files.remove("")
                    manifests[cache.name] = None
            for cache in todo:
                log.info("activation cache: %s %s (train pass: %d windows, held-out: %d windows)",
                         "building" if manifests[cache.name] is None else "extending", cache.location,
                         len(plan.ordered["train"]), len(plan.ordered["eval"]))
            _build(todo, plan, request, activations, leases=leases)
            for cache in todo:
                manifests[cache.name] = cache.publish(request, manifests[cache.name])
        readers = {}
        for hook, cache in caches.items():
            manifest = cache.with_scale(manifests[cache.name], request)
            readers[hook] = CacheReader(cache, manifest, request)
        return readers


def build_share(caches: Mapping[str, ActivationCache], request: Request, windows: Windows,
                activations: ActivationsFn, index: int, count: int) -> int:
    """One of `count` builders (`saelab-cache build --shard index/count`): write its shards of every cache, no
    lock, no manifest. Returns the shards it wrote."""
    ordered = sorted(caches.values(), key=lambda c: c.name)
    before = sum(c.shards_written for c in ordered)
    _build(ordered, Plan(windows), request, activations, share=(index, count))
    return sum(c.shards_written for c in ordered) - before


def finish(caches: Mapping[str, ActivationCache], request: Request) -> None:
    """The finishing step (`saelab-cache build --finish`): check every part and publish each manifest. Refused
    in one line while another step holds a cache's lock, or when a shard is not built yet."""
    ordered = sorted(caches.values(), key=lambda c: c.name)
    with contextlib.ExitStack() as stack:
        for cache in ordered:
            try:
                stack.enter_context(cache.locked(wait=False))
            except CacheBusy as busy:
                raise ConfigError("--finish", cache.location, f"one finishing step at a time (another step holds "
                                  f"{busy}: wait for it; a lock not renewed for 5 minutes is taken over)") from None
        for cache in ordered:
            if not cache.files.exists(PLAN):
                raise ConfigError("--finish", cache.location, "a cache the builders have started "
                                  "(run saelab-cache build --shard I/N first)")
            manifest, _ = read_manifest(cache.files)
            cache.publish(request, manifest)


# -- reading -------------------------------------------------------------------------------------------------
class Shard:
    """One stored shard: fetched (and, from an object store, checksummed) only when read."""

    def __init__(self, files: Store, entry: Mapping[str, Any], dtype: str, d_model: int, verify: bool):
        self.files, self.entry, self.dtype, self.d_model, self.verify = files, dict(entry), dtype, d_model, verify

    def __len__(self) -> int:
        return int(self.entry["rows"])

    def stored(self) -> np.ndarray:
        """The shard as stored: memory-mapped locally (checked before training), fetched and checked remotely."""
        if self.files.local:
            return np.load(self.files.local_path(self.entry["file"]), mmap_mode="r")
        blob = self.files.read_bytes(self.entry["file"])
        if self.verify and (len(blob) != self.entry["bytes"] or bytes_sha256(blob) != self.entry["sha256"]):
            raise ConfigError("data.cache", self.files.url, f"an intact cache ({self.entry['file']} fails its "
                              "sha256 checksum as fetched; its rows were not used; delete that cache to rebuild it)")
        return npy_view(blob)

    def rows(self) -> Tensor:
        return decode(self.stored(), self.dtype)

    def float_rows(self) -> np.ndarray:
        """The rows as float32 for a group to gather: float32 shards as stored (a view, no copy), 16-bit ones
        widened here, in the fetching thread (several shards at once), not in the one thread that permutes."""
        stored = self.stored()
        return stored if self.dtype == "float32" else decode(stored, self.dtype).numpy()


def take_rows(shards: list[Shard], n_tokens: int) -> Tensor:
    """The first n_tokens rows of the shards, float32 (fewer if they hold fewer)."""
    taken, have = [], 0
    for shard in shards:
        if have >= n_tokens:
            break
        taken.append(decode(shard.stored()[: n_tokens - have], shard.dtype))
        have += len(taken[-1])
    return torch.cat(taken) if taken else torch.empty(0)


class CacheReader:
    """The shards one run reads; streams shuffled batches of train activations, read ahead in the background."""

    def __init__(self, cache: ActivationCache, manifest: Mapping[str, Any], request: Request):
        self.location, self.manifest, self.dtype = cache.location, manifest, cache.dtype
        self.scale = float(manifest["scales"][request.scale_key])
        self.train = cache.shards(select(manifest["streams"]["train"], request.needs("train")) or [])
        self.eval = cache.shards(select(manifest["streams"]["eval"], request.eval_tokens) or [])
        # Every held-out window, in corpus order: the tokens the held-out activations came from.
        windows = cache.files.read_bytes(manifest["windows"]["eval"]["file"])
        self.eval_windows = torch.from_numpy(np.load(io.BytesIO(windows))).long()

    @property
    def train_tokens(self) -> int:
        return sum(len(shard) for shard in self.train)

    def eval_activations(self, n_tokens: int) -> Tensor:
        """The first n_tokens held-out activations in corpus order (fewer if the held-out text is short)."""
        return take_rows(self.eval, n_tokens)

    def head(self, n_tokens: int) -> Tensor:
        """The first n_tokens train activations (what the normalisation scale was estimated on)."""
        return take_rows(self.train, n_tokens)

    def epoch(self, generator: torch.Generator, group_tokens: int = 0, scale: float = 1.0) -> Iterator[Tensor]:
        """Every train activation read by this run exactly once, as permuted groups of shards.

        Shards come in a random order; consecutive shards are grouped until a group holds `group_tokens`
        rows, and each group is permuted as a whole. Every shard is a random sample of the corpus's windows,
        so a group mixes as well as a shuffle buffer of that size, at a fraction of its copying. Rows are
        divided by `scale` once per group, not once per batch.

        Fetching shards (FETCH_THREADS at once) and permuting a group run in background threads, READ_AHEAD
        groups ahead of training: numpy, hashlib and the store's I/O release the GIL, so a batch does not wait
        for them, and memory holds at most READ_AHEAD + 1 groups. The random draws happen here, in order, so the
        stream is the same as without the threads.
        """
        order = torch.randperm(len(self.train), generator=generator).tolist()
        groups: list[list[Shard]] = []
        while order:
            groups.append([self.train[order.pop(0)]])
            while order and sum(len(shard) for shard in groups[-1]) < group_tokens:
                groups[-1].append(self.train[order.pop(0)])
        with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="saelab-cache-fetch") as fetcher, \
                ThreadPoolExecutor(1, thread_name_prefix="saelab-cache-permute") as permuter:
            ahead: deque[Future[Tensor]] = deque()
            for group in groups:
                permutation = torch.randperm(sum(len(shard) for shard in group), generator=generator).numpy()
                fetched = [fetcher.submit(shard.float_rows) for shard in group]
                ahead.append(permuter.submit(_permuted_rows, fetched, permutation))
                if len(ahead) > READ_AHEAD:
                    yield _scaled(ahead.popleft().result(), scale)
            while ahead:
                yield _scaled(ahead.popleft().result(), scale)

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


def npy_view(blob: bytes) -> np.ndarray:
    """The array an .npy file's bytes hold, as a read-only view of them (np.load would copy)."""
    header = io.BytesIO(blob)
    version = np.lib.format.read_magic(header)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(header)
    array = np.frombuffer(blob, dtype=dtype, count=int(np.prod(shape)), offset=header.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


def _permuted_rows(fetched: list[Future[np.ndarray]], permutation: np.ndarray) -> Tensor:
    """The group's float32 rows in the order `permutation` gives: each shard's rows scattered straight to their
    places (row i of the group goes to where[i], where = permutation's inverse): one copy of each row, no
    concatenated copy."""
    where = np.empty_like(permutation)
    where[permutation] = np.arange(len(permutation))
    out = np.empty((len(permutation), fetched[0].result().shape[1]), dtype=np.float32)
    start = 0
    for future in fetched:
        rows = future.result()
        out[where[start : start + len(rows)]] = rows
        start += len(rows)
    return torch.from_numpy(out)


def _scaled(rows: Tensor, scale: float) -> Tensor:
    return rows.div_(scale) if scale != 1.0 else rows


# -- reading a whole cache (export, inspection) --------------------------------------------------------------
class CacheContents:
    """A finished cache read as it is stored: its manifest, its rows shard by shard, its token windows."""

    def __init__(self, files: Store, manifest: Mapping[str, Any]):
        self.files, self.manifest = files, dict(manifest)

    def rows(self, stream: str) -> Iterator[np.ndarray]:
        """float32 [rows, d_model] shard by shard, in stored order, each checked against its sha256."""
        for entry in self.manifest["streams"][stream]["shards"]:
            shard = Shard(self.files, entry, self.manifest["dtype"], self.manifest["d_model"], verify=True)
            if self.files.local:
                problem = file_problem(self.files, entry, self.files.sizes(), checksum=True)
                if problem is not None:
                    raise ConfigError("cache", self.files.url, f"an intact cache ({problem})")
            yield shard.rows().numpy()

    def windows(self, stream: str) -> np.ndarray:
        """int [n_windows, context_size]: the stream's token windows in stored order; its rows are exactly the
        non-excluded positions of these windows, window by window."""
        return np.load(io.BytesIO(self.files.read_bytes(self.manifest["windows"][stream]["file"])))


def read_cache(location: str | Path) -> CacheContents:
    """One finished cache (the directory or URL holding its manifest.json); ConfigError when there is none."""
    files = Store(location)
    manifest, problem = read_manifest(files)
    if manifest is None:
        raise ConfigError("cache", str(location), f"a finished saelab activation cache ({problem or 'nothing there'})")
    return CacheContents(files, manifest)


__all__ = ["ActivationCache", "CacheReader", "CacheContents", "Plan", "Request", "all_files", "build_share",
           "encode", "decode", "finish", "open_caches", "read_cache", "take_rows"]
