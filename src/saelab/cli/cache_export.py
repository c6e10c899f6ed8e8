"""`saelab-cache export --format saelens SRC DEST`: one of saelab's activation caches written in SAELens's layout
(saelab.data.saelens_cache), so SAELens trains on exactly saelab's activations (`use_cached_activations=True`,
`cached_activations_path=DEST`).

saelab's cache (saelab.data.cache, read only through `read_cache`) stores float32 rows for the non-excluded
positions of its token windows, window by window; SAELens's stores one row per window, [context_size, d_in], every
position, with the window's `token_ids`, and its ActivationsStore drops the positions whose token id is in its
`exclude_special_tokens`. The export therefore writes every window of the stream (in saelab's stored order, a seeded
shuffle) with its real token ids, saelab's rows at the positions saelab kept, and zeros at the excluded positions
(saelab never computed them). Read by SAELens with `exclude_special_tokens=<the ids saelab excluded>` (listed in
DEST/saelab_export.json, with the other fields a SAELens config needs), its ActivationsStore yields exactly saelab's
rows, in saelab's order (tests/test_saelens_cache.py checks it in SAELens itself). Why not drop the special positions
instead: SAELens's rows are context windows with their token ids, and other tools read them as such; the zeros are
never trained on as long as the excluded ids are given. With `exclude_special_tokens=True` SAELens drops only BOS,
EOS, PAD and SEP: a window's CLS, UNK or MASK positions would then come through as zero rows.

SAELens reads whole batches of `store_batch_size_prompts` windows and skips a last partial one each epoch: with a
batch size that divides the window count it reads every row. Only the windows whose rows the cache holds are written
(a cache built for a small budget holds a prefix of its train stream). The train stream by default, or the held-out
one (--stream eval). float32 (exact, whatever the cache's storage dtype) or float16 (--dtype float16).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from saelab.data.saelens_cache import filesystem, write_saelens_cache
from saelab.errors import ConfigError

log = logging.getLogger("saelab.cache")
SIDECAR = "saelab_export.json"
FORMATS = ("saelens",)
CHUNK_WINDOWS = 256  # windows laid out at a time (a record batch of the written cache at most 1000)


def add_parser(commands: Any) -> None:
    """The `export` subcommand of saelab-cache."""
    parser = commands.add_parser("export", help="write a cache in another library's layout (SAELens's)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="the layout: saelens (CacheActivationsRunner's)")
    parser.add_argument("--stream", default="train", choices=("train", "eval"), help="which stream (default: train)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="the stored dtype")
    parser.add_argument("--windows-per-file", type=int, default=8192, help="context windows per arrow file")
    parser.add_argument("source", help="a saelab cache: the directory or URL holding its manifest.json")
    parser.add_argument("dest", help="a new or empty directory or URL for the SAELens cache")


def run(args: argparse.Namespace) -> int:
    written = export_saelens(args.source, args.dest, args.stream, args.dtype, args.windows_per_file)
    print(f"{args.dest}: {written['windows']} windows, {written['rows']} of saelab's rows (SAELens: "
          f"exclude_special_tokens={written['saelens']['exclude_special_tokens']})")
    return 0


def export_saelens(source: str, dest: str, stream: str = "train", dtype: str = "float32",
                   windows_per_file: int = 8192) -> dict[str, Any]:
    """Write the stream of the saelab cache at `source` as a SAELens cache at `dest`; returns the sidecar written."""
    from saelab.data.cache import read_cache

    if windows_per_file < 1:
        raise ConfigError("--windows-per-file", windows_per_file, "a positive number of windows")
    _check_empty(dest)
    contents = read_cache(source)
    manifest = contents.manifest
    hook, d_in, ctx = str(manifest["inputs"]["hook"]), int(manifest["d_model"]), int(manifest["context_size"])
    excluded = sorted(int(i) for i in manifest["inputs"]["special_tokens"]["excluded"])
    windows = np.asarray(contents.windows(stream))
    kept = ~np.isin(windows, excluded)
    n_rows = sum(int(shard["rows"]) for shard in manifest["streams"][stream]["shards"])
    ends = np.cumsum(kept.sum(1))
    n_windows = int(np.searchsorted(ends, n_rows, side="left")) + 1 if n_rows else 0
    if n_rows == 0 or n_windows > len(windows) or int(ends[n_windows - 1]) != n_rows:
        raise ConfigError("source", source, f"a cache whose {stream} rows ({n_rows}) fill whole windows of its "
                          f"{len(windows)} {stream} windows")
    sidecar = {
        "exported_by": "saelab", "source": str(source), "stream": stream, "model": manifest["inputs"].get("model"),
        "hook": hook, "context_size": ctx, "d_in": d_in, "dtype": dtype, "windows": n_windows, "rows": n_rows,
        "excluded_token_ids": excluded, "excluded_positions": "zeros",
        "saelens": {"hook_name": hook, "context_size": ctx, "d_in": d_in, "use_cached_activations": True,
                    "cached_activations_path": str(dest), "exclude_special_tokens": excluded},
    }
    fingerprint = hashlib.sha256(json.dumps([manifest, stream, dtype], sort_keys=True, default=str).encode())
    write_saelens_cache(dest, hook, ctx, d_in, n_windows, _laid_out(source, contents.rows(stream),
                                                                  windows[:n_windows], kept[:n_windows], d_in),
                        dtype=dtype, windows_per_file=windows_per_file, fingerprint=fingerprint.hexdigest()[:16],
                        extra={SIDECAR: json.dumps(sidecar, indent=2).encode()})
    log.info("exported %d %s windows (%d rows) of %s at %s to %s", n_windows, stream, n_rows, hook, source, dest)
    return sidecar


def _laid_out(source: str, rows: Iterator[np.ndarray], windows: np.ndarray, kept: np.ndarray, d_in: int
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(activations [n, ctx, d], token ids [n, ctx]) chunk by chunk: saelab's rows at the kept positions, in order,
    zeros elsewhere."""
    pending, have = [], 0
    for start in range(0, len(windows), CHUNK_WINDOWS):
        mask = kept[start : start + CHUNK_WINDOWS]
        need = int(mask.sum())
        while have < need:
            chunk = next(rows, None)
            if chunk is None:
                raise ConfigError("source", source, f"a cache whose rows fill its windows' kept positions (they end "
                                  f"{need - have} short)")
            pending.append(chunk)
            have += len(chunk)
        flat = np.concatenate(pending) if len(pending) != 1 else pending[0]
        acts = np.zeros((*mask.shape, d_in), dtype=np.float32)
        acts[mask] = flat[:need]
        pending, have = [flat[need:]], have - need
        yield acts, windows[start : start + CHUNK_WINDOWS]
    if have or next(rows, None) is not None:
        raise ConfigError("source", source, "a cache whose rows fill its windows' kept positions (rows are left over)")


def _check_empty(dest: str) -> None:
    """ConfigError unless `dest` is new or an empty directory (an export never overwrites)."""
    fs, root = filesystem(dest)
    try:
        taken = fs.exists(root) and (not fs.isdir(root) or bool(fs.ls(root)))
    except OSError as err:
        raise ConfigError("dest", dest, f"a new or empty directory or URL ({type(err).__name__}: {err})") from None
    if taken:
        raise ConfigError("dest", dest, "a new or empty directory or URL (an export never overwrites)")
