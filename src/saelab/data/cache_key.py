"""The activation cache's key and its data.cache setting: where a cache lives and what names it.

The key is a sha256 of everything that decides the activations (saelab.data.cache's docstring says what and why):
the data source's own inputs (DataSource.key_inputs), the model's files, dtype and hook, the windowing, and the
code that turns text into activations. It needs no documents, so a reused cache loads no text.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

from saelab.data.cache_store import ALLOWED, Store
from saelab.data.model import LoadedModel
from saelab.data.tokens import SpecialTokens
from saelab.errors import ConfigError

FORMAT = 2  # bump when the layout or the meaning of a cache changes
TRAIN_ORDER_SEED = 0  # the cached train stream's fixed order (not the run's seed: every seed of a sweep shares it)
_OFF = ("off", "false", "none", "")
_SMALL_FILE = 2**20
# The code that turns text into activations: editing it changes the key (caches are cheap to rebuild).
_CODE = ("sources/base.py", "tokens.py", "activations.py", "hf_reader.py", "model.py", "normalize.py")


# -- the data.cache setting ----------------------------------------------------------------------------------
def is_off(value: Any) -> bool:
    """`data.cache` values that mean no cache (YAML and the command line spell off as off, false or null)."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF)


def cache_store(value: Any, auto_root: str | Path, create: bool = True) -> Store | None:
    """Where caches live for `data.cache` (None when off): a local directory or an fsspec URL. Fails with one line
    naming data.cache if it cannot be reached, listed or written (unreachable endpoint, refused credentials,
    missing bucket, unwritable directory), before any heavy work.

    With `create=False` (a check before the run starts) the local directories made to prove it writable are
    removed again, so a run rejected later leaves no empty cache directory behind.
    """
    if is_off(value):
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError("data.cache", value, ALLOWED)
    location = str(auto_root if value == "auto" else value)
    try:
        store = Store(location)
    except (ImportError, ValueError) as err:  # an unknown protocol, or its package (gcsfs, ...) not installed
        raise ConfigError("data.cache", str(value), f"{ALLOWED} (fsspec cannot open it: {err})") from None
    made = [] if not store.local else [p for p in (Path(store.root), *Path(store.root).parents) if not p.exists()]
    try:
        store.check_writable(str(value))
    finally:
        for path in made if not create else ():
            with contextlib.suppress(OSError):
                path.rmdir()
    return store


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
        "cache_dtype": str(data_cfg["cache_dtype"]),
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
        """The spec of `model` for `hook` (default: its first hook); for a site diff/<hook>, the spec of the
        diffing pair's second model (model.diff_with) for <hook>: its own files key its cache."""
        model, hook = model.side(hook or model.hooks[0])
        cfg = model.bridge.cfg
        return cls(model.name, str(getattr(cfg, "model_name", None) or model.name),
                   str(getattr(cfg, "dtype", "")).removeprefix("torch."), hook)


def cache_name(inputs: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    slug = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s).rstrip("/").split("/")[-1])  # noqa: E731
    return f"{slug(inputs['model'])}--{slug(inputs['hook'])}--{digest}"


