"""SAELens's cached-activations layout, read and written: what `CacheActivationsRunner` writes and `ActivationsStore`
reads (`cached_activations_path`), at a local directory or any fsspec URL (s3://, gs://, memory://, ...).

The layout is a Hugging Face `datasets` directory (`Dataset.save_to_disk`):

    dataset_info.json    the features: one `Array2D(shape=(context_size, d_in))` column named after the hook, and
                         `token_ids`, a list of context_size int32 ids (SAELens 6 writes it; older caches lack it)
    state.json           `_data_files`: the arrow files, in order, and a fingerprint
    data-00000-of-0000N.arrow ...  Arrow IPC streams of record batches, one row per context window

A cache SAELens pushed to the Hub (`hf_repo_id`: `push_to_hub`'s layout, *.parquet files whose schema carries the
same features) reads too, row group by row group, e.g. from a local download or an hf://datasets/... URL.

Reading streams record batch by record batch (memory-mapped locally, fetched by fsspec otherwise): a cache is never
held in memory whole, and a bounded slice of a batch at a time is converted to float32. `datasets` parses the
features and pyarrow reads the files; nothing of either format is re-implemented here.

Writing (`write_saelens_cache`) puts the arrow files first and state.json last: `datasets.load_from_disk` (what
SAELens calls) reads only the files state.json lists, so a cache is readable exactly when it is complete.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

INFO, STATE = "dataset_info.json", "state.json"
TOKEN_IDS = "token_ids"
CHUNK_BYTES = 64 * 2**20  # float32 bytes of activations converted at a time (a slice of a record batch)
WRITE_BATCH_WINDOWS = 1000  # rows per record batch written (datasets' own default batch size)


class NotASAELensCache(ValueError):
    """The location holds no SAELens activation cache; the message says what is missing or wrong."""


@dataclass(frozen=True)
class Windows:
    """Consecutive context windows of one data file of a cache; `start` is the first one's index in that file."""

    file: int
    start: int
    activations: np.ndarray  # float32 [n, context_size, d_in]
    token_ids: np.ndarray | None  # int [n, context_size]; None for a cache without the column


@dataclass(frozen=True)
class SAELensCache:
    """One SAELens cache: its columns and files, read from dataset_info.json and state.json (no activation is read
    until `windows` is iterated)."""

    location: str
    fs: Any  # fsspec.AbstractFileSystem
    root: str
    hooks: dict[str, tuple[int, int]]  # activation column -> (context_size, d_in)
    has_token_ids: bool
    files: tuple[str, ...]
    fingerprint: str | None

    @classmethod
    def open(cls, location: str | os.PathLike[str]) -> SAELensCache:
        """The cache at `location`, or NotASAELensCache saying why it is none."""
        from datasets import Array2D

        fs, root = filesystem(location)
        try:
            found = fs.exists(root)
        except OSError as err:  # unreachable, credentials refused, ...: fsspec's reason
            raise NotASAELensCache(f"{type(err).__name__}: {err}") from None
        if not found:
            raise NotASAELensCache("no such directory")
        try:
            features, files, fingerprint = (_saved(fs, root) if fs.exists(join(root, STATE)) else _pushed(fs, root))
        except FileNotFoundError as err:
            raise NotASAELensCache(f"no {os.path.basename(str(err.filename or err)) or 'such file'} there (a "
                                   f"saved datasets directory has {INFO} and {STATE}; one pushed to the Hub, "
                                   "*.parquet files)") from None
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowInvalid) as err:
            raise NotASAELensCache(f"unreadable metadata: {type(err).__name__}: {err}") from None
        hooks = {name: (int(f.shape[0]), int(f.shape[1])) for name, f in features.items() if isinstance(f, Array2D)}
        if not hooks:
            raise NotASAELensCache(f"no Array2D activation column (its columns: {', '.join(features) or 'none'})")
        if not files:
            raise NotASAELensCache("no data files listed")
        return cls(str(location), fs, root, hooks, TOKEN_IDS in features, files, fingerprint)

    def windows(self, hook: str, chunk_bytes: int = CHUNK_BYTES, files: Iterable[int] | None = None
                ) -> Iterator[Windows]:
        """The hook's activations (and token ids) window by window in stored order, at most ~chunk_bytes of float32
        at a time; `files`: the indices of the data files to read, in that order (default: all, in order)."""
        context_size, d_in = self.hooks[hook]
        per_chunk = max(1, chunk_bytes // (4 * context_size * d_in))
        for index in range(len(self.files)) if files is None else files:
            start = 0
            for batch in self._record_batches(self.files[index], per_chunk):
                for offset in range(0, batch.num_rows, per_chunk):
                    part = batch.slice(offset, per_chunk)
                    acts = _values(part.column(hook)).reshape(part.num_rows, context_size, d_in)
                    ids = _values(part.column(TOKEN_IDS)).reshape(part.num_rows, context_size) \
                        if self.has_token_ids else None
                    yield Windows(index, start, acts.astype(np.float32, copy=False), ids)
                    start += part.num_rows

    def _record_batches(self, name: str, rows: int) -> Iterator[pa.RecordBatch]:
        """The file's record batches (an arrow stream's own; a parquet file's row groups in batches of `rows`)."""
        path = join(self.root, name)
        try:
            with (pa.memory_map(path) if isinstance(self.fs, LocalFileSystem) else self.fs.open(path, "rb")) as f:
                if name.endswith(".parquet"):
                    yield from pq.ParquetFile(f).iter_batches(batch_size=rows)
                else:
                    yield from pa.ipc.open_stream(f)
        except (OSError, pa.ArrowInvalid) as err:
            raise NotASAELensCache(f"{join(self.location, name)}: {type(err).__name__}: {err}") from err


def _saved(fs: Any, root: str) -> tuple[Any, tuple[str, ...], str | None]:
    """(features, arrow files, fingerprint) of a `save_to_disk` directory (what CacheActivationsRunner writes)."""
    from datasets import Features

    info, state = (json.loads(fs.cat_file(join(root, name))) for name in (INFO, STATE))
    files = tuple(str(entry["filename"]) for entry in state["_data_files"])
    return Features.from_dict(info["features"]), files, state.get("_fingerprint")


def _pushed(fs: Any, root: str) -> tuple[Any, tuple[str, ...], str | None]:
    """(features, parquet files, None) of a `push_to_hub` layout (a cache SAELens put on the Hub, hf_repo_id: every
    *.parquet under the root, sorted; the features from the first one's schema metadata)."""
    from datasets import Features

    prefix = root.rstrip("/") + "/"
    files = tuple(sorted(path[len(prefix):] for path in fs.glob(prefix + "**/*.parquet") if path.startswith(prefix)))
    if not files:
        raise FileNotFoundError(None, "not found", INFO)
    with fs.open(prefix + files[0], "rb") as f:
        metadata = pq.read_schema(f).metadata or {}
    return Features.from_dict(json.loads(metadata[b"huggingface"])["info"]["features"]), files, None


def _values(column: pa.Array) -> np.ndarray:
    """The flat values of a (nested) list column, slicing respected: Array2D's list<list<x>>, token_ids' list."""
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) \
            or pa.types.is_large_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def filesystem(location: str | os.PathLike[str]) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) of a local directory or a URL."""
    text = str(location)
    return fsspec.core.url_to_fs(text if "://" in text else os.path.expanduser(text))


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def write_saelens_cache(location: str | os.PathLike[str], hook: str, context_size: int, d_in: int,
                        n_windows: int, windows: Iterable[tuple[np.ndarray, np.ndarray]], *,
                        dtype: str = "float32", windows_per_file: int = 8192, fingerprint: str | None = None,
                        extra: Mapping[str, bytes] | None = None) -> int:
    """Write `n_windows` windows (an iterable of (activations [n, ctx, d], token ids [n, ctx]) in order) as a SAELens
    cache at `location` (a new or empty directory or URL prefix), `dtype` float32 or float16, with `extra` files
    ({name: bytes}) beside it; returns the windows written. state.json is written last."""
    from datasets import Array2D, Features, List, Value
    from datasets.features.features import numpy_to_pyarrow_listarray

    fs, root = filesystem(location)
    features = Features({hook: Array2D(shape=(context_size, d_in), dtype=dtype),
                         TOKEN_IDS: List(Value("int32"), length=context_size)})
    schema = features.arrow_schema
    n_files = max(1, math.ceil(n_windows / windows_per_file))
    names = [f"data-{i:05d}-of-{n_files:05d}.arrow" for i in range(n_files)]
    if n_windows < 1:
        raise ValueError(f"no windows to write to {location}")
    fs.makedirs(root, exist_ok=True)
    written = 0
    for index, group in itertools.groupby(_by_file(windows, windows_per_file), key=lambda piece: piece[0]):
        if index >= n_files:
            raise ValueError(f"more than the {n_windows} windows announced for {location}")
        with fs.open(join(root, names[index]), "wb") as f, pa.ipc.new_stream(f, schema) as writer:
            for _, acts, ids in group:
                storage = numpy_to_pyarrow_listarray(acts.astype(dtype, copy=False))
                column = pa.ExtensionArray.from_storage(schema.field(hook).type, storage)
                tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int32)), context_size)
                writer.write_batch(pa.RecordBatch.from_arrays([column, tokens], schema=schema))
                written += len(acts)
    if written != n_windows:
        raise ValueError(f"{written} windows written to {location}, {n_windows} announced")
    fs.pipe_file(join(root, INFO), json.dumps({"citation": "", "description": "", "features": features.to_dict(),
                                               "homepage": "", "license": ""}, indent=2).encode())
    for name, data in (extra or {}).items():
        fs.pipe_file(join(root, name), data)
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": fingerprint,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    fs.pipe_file(join(root, STATE), json.dumps(state, indent=2).encode())
    return written


def _by_file(windows: Iterable[tuple[np.ndarray, np.ndarray]], per_file: int
             ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(file index, activations, ids): the windows in pieces of at most WRITE_BATCH_WINDOWS (a record batch each),
    none straddling two files of `per_file` windows."""
    done = 0
    for acts, ids in windows:
        while len(acts):
            take = min(len(acts), per_file - done % per_file, WRITE_BATCH_WINDOWS)
            yield done // per_file, acts[:take], ids[:take]
            acts, ids, done = acts[take:], ids[take:], done + take
