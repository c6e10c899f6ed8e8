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
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor

from saelab.data.model import LoadedModel
from saelab.data.normalize import estimate_scale
from saelab.data.tokens import SpecialTokens
from saelab.errors import ConfigError
from saelab.io import atomic_write, write_json

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the meaning of a cache changes
MANIFEST = "manifest.json"
# A shard holds W windows: at most SHARD_BYTES (sequential reads, bounded memory while permuting it) and at
# most SHARD_TOKENS activations (budgets round up to whole shards; more shards = better shuffled epochs).
SHARD_BYTES = 64 * 2**20
SHARD_TOKENS = 2**15
TRAIN_ORDER_SEED = 0
STREAMS = ("train", "eval")
_OFF = ("off", "false", "none", "")
_ALLOWED = "off, auto or a writable directory"
_SMALL_FILE = 2**20
_KEYS = {"inputs", "streams", "eval_windows", "scales", "shard_windows", "d_model"}  # of a usable manifest
# The code that turns text into activations: editing it changes the key (caches are cheap to rebuild).
_CODE = ("sources/base.py", "tokens.py", "activations.py", "hf_reader.py", "model.py", "normalize.py")

Windows = dict[str, Tensor]  # {"train": [n, ctx], "eval": [m, ctx]} token windows
ActivationsFn = Callable[[Tensor], Iterator[Tensor]]  # windows -> float32 [rows, d] chunks


# -- the data.cache setting ----------------------------------------------------------------------------------
def is_off(value: Any) -> bool:
    """`data.cache` values that mean no cache (YAML and the command line spell off as off, false or null)."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF)


def cache_root(value: Any, auto_root: str | Path, create: bool = True) -> Path | None:
    """Where caches live for `data.cache` (None when off). Fails with one line if it cannot be written.

    With `create=False` (a check before the run starts) the directories made to prove it writable are
    removed again, so a run rejected later leaves no empty cache directory behind.
    """
    if is_off(value):
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError("data.cache", value, _ALLOWED)
    root = Path(auto_root if value == "auto" else value).expanduser()
    made = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError("data.cache", str(value),
                          f"{_ALLOWED} ({root} is not writable: {err.strerror or err})") from None
    finally:
        for path in made if not create else ():
            with contextlib.suppress(OSError):
                path.rmdir()
    return root


# -- the key -------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> str:
    """Digest of a file or directory: contents of small files, size + mtime of large ones (weights)."""
    path = Path(path)
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
        files = [(rel, p) for rel, p in files if not any(part.startswith(".") for part in rel.split("/"))]
    digest = hashlib.sha256()
    for rel, file in files:
        stat = file.stat()
        content = file_sha256(file) if stat.st_size <= _SMALL_FILE else f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{rel}\0{content}\n".encode())
    return digest.hexdigest()


def model_directory(source: str) -> Path | None:
    """The local directory a model was loaded from: the path itself, or its snapshot in the HF hub cache."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
    except Exception:  # an unusual hub cache must not stop training: fall back to the name
        return None
    return Path(found).parent if isinstance(found, str) else None


class KeyedSource(Protocol):
    """What the key needs of a data source (saelab.data.sources.DataSource is one)."""

    name: str

    def key_inputs(self) -> dict[str, Any]: ...


def key_inputs(source: KeyedSource, data_cfg: Mapping[str, Any], model: ModelSpec, special: SpecialTokens
               ) -> dict[str, Any]:
    """Everything that decides the cached activations (see the module docstring), JSON-serialisable: the source's
    own inputs (DataSource.key_inputs, its class and code included) and the model's."""
    model_dir = model_directory(model.source)
    code_dir = Path(__file__).parent
    source_code = Path(inspect.getsourcefile(type(source)) or code_dir / "sources" / "base.py")
    return {
        "format": FORMAT,
        "model": model.name,
        "model_files": fingerprint(model_dir) if model_dir else f"unresolved:{model.source}",
        "model_dtype": model.dtype,
        "transformer_lens": version("transformer-lens"),
        "hook": model.hook,
        "source": {"name": source.name, **source.key_inputs()},
        "context_size": int(data_cfg["context_size"]),
        "prepend_bos": bool(data_cfg["prepend_bos"]),
        "eval_fraction": float(data_cfg["eval_fraction"]),
        "special_tokens": {"bos": special.bos, "separator": special.separator,
                           "excluded": sorted(special.excluded)},
        "train_order_seed": TRAIN_ORDER_SEED,
        "code": hashlib.sha256(b"".join([*((code_dir / f).read_bytes() for f in _CODE), source_code.read_bytes()])
                               ).hexdigest(),
    }


@dataclass(frozen=True)
class ModelSpec:
    """The model facts the key needs; none of them needs the weights loaded."""

    name: str  # model.name, e.g. sentence-transformers/all-MiniLM-L6-v2
    source: str  # the local directory or hub name it is loaded from
    dtype: str  # model.dtype
    hook: str  # the hook whose activations are cached

    @classmethod
    def of(cls, model: LoadedModel, hook: str | None = None) -> ModelSpec:
        """The spec of `model` for `hook` (default: its first hook)."""
        cfg = model.bridge.cfg
        return cls(model.name, str(getattr(cfg, "model_name", None) or model.name),
                   str(getattr(cfg, "dtype", "")).removeprefix("torch."), hook or model.hooks[0])


def cache_name(inputs: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    slug = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s).rstrip("/").split("/")[-1])  # noqa: E731
    return f"{slug(inputs['model'])}--{slug(inputs['hook'])}--{digest}"


# -- the manifest --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What one run reads: activations of each stream, and the normalisation it wants."""

    train_tokens: int
    eval_tokens: int
    normalize: str
    normalize_tokens: int

    def needs(self, stream: str) -> int:
        return max(self.train_tokens, self.normalize_tokens) if stream == "train" else self.eval_tokens

    @property
    def scale_key(self) -> str:
        return f"{self.normalize}/{self.normalize_tokens}"


def select(stream: Mapping[str, Any], tokens: int) -> list[dict[str, Any]] | None:
    """The shortest prefix of shards holding `tokens` activations (all if the pass is shorter), else None."""
    have = 0
    for i, shard in enumerate(stream["shards"]):
        have += shard["rows"]
        if have >= tokens:
            return stream["shards"][: i + 1]
    return list(stream["shards"]) if stream["complete"] else None


def file_problem(directory: Path, entry: Mapping[str, Any]) -> str | None:
    """Why a file listed in the manifest cannot be read as written (None if it can)."""
    path = directory / entry["file"]
    if not path.is_file():
        return f"{entry['file']} is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{entry['file']} has {path.stat().st_size} bytes, expected {entry['bytes']}"
    if file_sha256(path) != entry["sha256"]:
        return f"{entry['file']} fails its sha256 checksum"
    return None


def read_manifest(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, why it is unusable); (None, None) when there is no cache at all."""
    if not directory.exists():
        return None, None
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "no manifest.json (an interrupted build)"
    except (OSError, ValueError) as err:
        return None, f"unreadable manifest.json ({err})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not set(manifest) >= _KEYS:
        return None, f"manifest.json is not a saelab cache manifest of format {FORMAT}"
    return manifest, None


def tokens(manifest: Mapping[str, Any], stream: str) -> int:
    return sum(s["rows"] for s in manifest["streams"][stream]["shards"])


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
                 tokens(manifest, "train"), tokens(manifest, "eval"), _bytes(manifest) / 2**20)
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


def _bytes(manifest: Mapping[str, Any]) -> int:
    return sum(s["bytes"] for spec in manifest["streams"].values() for s in spec["shards"])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- inspection (the saelab-cache command) -------------------------------------------------------------------
def summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The facts a person scanning caches wants: model, hook, source, tokens, size, completeness."""
    inputs = manifest["inputs"]
    return {
        "model": inputs["model"], "hook": inputs["hook"],
        "source": inputs["source"].get("path") or inputs["source"]["name"],
        "context_size": manifest["context_size"], "d_model": manifest["d_model"],
        "train_tokens": tokens(manifest, "train"), "eval_tokens": tokens(manifest, "eval"),
        "train_pass_complete": manifest["streams"]["train"]["complete"],
        "shards": sum(len(spec["shards"]) for spec in manifest["streams"].values()),
        "mbytes": round(_bytes(manifest) / 2**20, 1), "updated": manifest.get("updated"),
    }


def verify(directory: Path) -> list[str]:
    """Every problem with a cache directory (empty when it is intact), checking every shard."""
    manifest, problem = read_manifest(Path(directory))
    if manifest is None:
        return [problem or f"{directory} does not exist"]
    files = [manifest["eval_windows"], *(s for spec in manifest["streams"].values() for s in spec["shards"])]
    return [p for s in files if (p := file_problem(Path(directory), s)) is not None]
