"""An activation cache's manifest and plan: what a cache holds, whether each file is intact, and the summary
`saelab-cache list` and `inspect` show (saelab.data.cache's docstring describes the layout)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saelab.data.cache_key import FORMAT
from saelab.data.cache_store import Store

MANIFEST = "manifest.json"
PLAN = "plan.json"
PARTS = "parts"  # one small JSON per finished shard: what a finishing step publishes
STREAMS = ("train", "eval")
STORED_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}  # data.cache_dtype -> bytes per value
_KEYS = {"inputs", "streams", "windows", "scales", "shard_windows", "d_model", "dtype"}  # of a usable manifest


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


def shards_needed(rows: Sequence[int], tokens: int) -> int:
    """How many shards of a pass (rows per shard, the whole pass) the shortest prefix holding `tokens` takes."""
    have = 0
    for i, n in enumerate(rows):
        have += n
        if have >= tokens:
            return i + 1
    return len(rows)


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_problem(files: Store, entry: Mapping[str, Any], sizes: Mapping[str, int], checksum: bool) -> str | None:
    """Why a file listed in the manifest cannot be read as written (None if it can). `sizes` is the cache's
    listing; `checksum`: also read the file and check its sha256 (remote caches check it as shards are read)."""
    name = entry["file"]
    if name not in sizes:
        return f"{name} is missing"
    if sizes[name] != entry["bytes"]:
        return f"{name} has {sizes[name]} bytes, expected {entry['bytes']}"
    if checksum and bytes_sha256(files.read_bytes(name)) != entry["sha256"]:
        return f"{name} fails its sha256 checksum"
    return None


def read_manifest(files: Store) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, why it is unusable); (None, None) when there is no cache at all."""
    if not files.sizes() and not files.exists(""):
        return None, None
    try:
        manifest = files.read_json(MANIFEST)
    except FileNotFoundError:
        return None, "no manifest.json (a build not finished)"
    except (OSError, ValueError) as err:
        return None, f"unreadable manifest.json ({err})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not set(manifest) >= _KEYS:
        return None, f"manifest.json is not a saelab cache manifest of format {FORMAT}"
    return manifest, None


def tokens(manifest: Mapping[str, Any], stream: str) -> int:
    return sum(s["rows"] for s in manifest["streams"][stream]["shards"])


def all_files(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*manifest["windows"].values(), *(s for spec in manifest["streams"].values() for s in spec["shards"])]


# -- inspection (the saelab-cache command) -------------------------------------------------------------------
def summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The facts a person scanning caches wants: model, hook, source, tokens, size, completeness."""
    inputs = manifest["inputs"]
    return {
        "model": inputs["model"], "hook": inputs["hook"],
        "source": inputs["source"].get("path") or inputs["source"]["name"],
        "dtype": manifest["dtype"], "context_size": manifest["context_size"], "d_model": manifest["d_model"],
        "train_tokens": tokens(manifest, "train"), "eval_tokens": tokens(manifest, "eval"),
        "train_pass_complete": manifest["streams"]["train"]["complete"],
        "shards": sum(len(spec["shards"]) for spec in manifest["streams"].values()),
        "mbytes": round(manifest_bytes(manifest) / 2**20, 1), "updated": manifest.get("updated"),
    }


def verify(files: Store) -> list[str]:
    """Every problem with a cache (empty when it is intact), checking every file's sha256."""
    manifest, problem = read_manifest(files)
    if manifest is None:
        return [problem or f"{files.url} does not exist"]
    sizes = files.sizes()
    return [p for s in all_files(manifest) if (p := file_problem(files, s, sizes, checksum=True)) is not None]


def manifest_bytes(manifest: Mapping[str, Any]) -> int:
    return sum(s["bytes"] for spec in manifest["streams"].values() for s in spec["shards"])
