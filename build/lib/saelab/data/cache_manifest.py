"""An activation cache's manifest: what a cache directory holds, whether each file is intact, and the summary
`saelab-cache list` and `inspect` show (saelab.data.cache's docstring describes the layout)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.data.cache_key import FORMAT, file_sha256

MANIFEST = "manifest.json"
STREAMS = ("train", "eval")
_KEYS = {"inputs", "streams", "eval_windows", "scales", "shard_windows", "d_model"}  # of a usable manifest


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
        "mbytes": round(manifest_bytes(manifest) / 2**20, 1), "updated": manifest.get("updated"),
    }


def verify(directory: Path) -> list[str]:
    """Every problem with a cache directory (empty when it is intact), checking every shard."""
    manifest, problem = read_manifest(Path(directory))
    if manifest is None:
        return [problem or f"{directory} does not exist"]
    files = [manifest["eval_windows"], *(s for spec in manifest["streams"].values() for s in spec["shards"])]
    return [p for s in files if (p := file_problem(Path(directory), s)) is not None]

def manifest_bytes(manifest: Mapping[str, Any]) -> int:
    return sum(s["bytes"] for spec in manifest["streams"].values() for s in spec["shards"])
