"""`saelab-cache`: build, list and inspect on-disk activation caches (see saelab.data.cache).

    saelab-cache build [overrides...]      build or extend the caches that `saelab-train` with the same
                                           overrides reads (data.cache=auto unless set), without training
    saelab-cache build --shard I/N [...]   worker I of N: only its share of the shards (no manifest)
    saelab-cache build --finish [...]      after the workers: check every shard and publish the manifest
    saelab-cache list [--cache-dir DIR]    the caches under DIR or URL (default: paths.cache_dir)
    saelab-cache inspect DIR               one cache's manifest, then a checksum of every shard
    saelab-cache export --format saelens SRC DEST   a cache in SAELens's layout (saelab.cli.cache_export)

Building ahead of a sweep is optional (the first job of a multirun builds the cache and the others wait),
but it lets a cluster sweep start from a cache built on one GPU node.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from omegaconf import DictConfig

from saelab.cli import cache_export
from saelab.cli.checks import check_group_overrides
from saelab.data.cache_key import is_off
from saelab.data.cache_manifest import MANIFEST, all_files, read_manifest, summary, verify
from saelab.data.cache_store import Store
from saelab.errors import ConfigError, bad_input_exit
from saelab.run.compose import compose_run_config

_COLUMNS = ("name", "model", "hook", "source", "dtype", "train_tokens", "eval_tokens", "mbytes",
            "train_pass_complete")


def load_config(overrides: list[str]) -> DictConfig:
    """The same composed config `saelab-train` would run with these overrides."""
    return compose_run_config(overrides)


def parse_share(value: str | None) -> tuple[int, int] | None:
    """`--shard I/N` -> (I, N), refused in one line unless 0 <= I < N."""
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count)):
        raise ConfigError("--shard", value, "I/N with 0 <= I < N (this worker's index and the number of workers), "
                          "e.g. 0/4")
    return int(index), int(count)


def build(overrides: list[str], shard: str | None = None, finishing: bool = False) -> int:
    """Build (all of it, `shard` I/N's share, or only the finishing step) the caches `saelab-train` with these
    overrides reads: one per hook the job reads (a transcoder's input and target), filled by one forward pass."""
    from saelab.run.job import activations_needed
    from saelab.run.schema import check_run_config
    from saelab.run.stream import Reader, open_one_stream
    from saelab.run.training import world_size

    share = parse_share(shard)
    if share is not None and finishing:
        raise ConfigError("--finish", True, "alone: the finishing step builds no shards (run it after the --shard "
                          "workers, without --shard)")
    problem = check_group_overrides(overrides)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    cfg = load_config(overrides)
    if is_off(cfg.data.get("cache")):
        cfg.data.cache = "auto"
    source = check_run_config(cfg)  # a bad data.cache fails here, before the model loads
    train_tokens = activations_needed(cfg, world_size(cfg))  # what `saelab-train` with this config will read
    if not source.needs_model:
        raise ConfigError("data", source.name, "a source read through a model (its activations are what is cached)")
    sites = source.sites(cfg.model)
    reader = Reader(sites.hook, sites.target_hook, sites=sites)
    whole = share is None and not finishing
    stream = open_one_stream(cfg, reader, train_tokens, source=source, held_out_only=not whole)
    datamodule = stream.datamodule
    if whole:
        for cache in datamodule.caches.values():
            print(cache.location)
    elif finishing:
        for location in datamodule.finish_cache():
            print(location)
    else:
        written = datamodule.build_cache_share(*share)
        print(f"worker {share[0]}/{share[1]}: {written} shards written (publish with saelab-cache build --finish)")
    return 0


def list_caches(cache_dir: str | None) -> int:
    root = Store(cache_dir if cache_dir else load_config([]).paths.cache_dir)
    rows = []
    for name in (n for n in root.dirs() if not n.startswith(".")):
        manifest, problem = read_manifest(root.child(name))
        if manifest is not None:
            rows.append({"name": name, **summary(manifest)})
        else:
            rows.append({"name": name, "model": f"({problem})"})
    if not rows:
        print(f"no caches under {root.url}")
        return 0
    table = [[str(row.get(c, "")) for c in _COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(_COLUMNS)]
    for line in [list(_COLUMNS), *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def inspect(directory: str) -> int:
    files = Store(directory)
    manifest, problem = read_manifest(files)
    if manifest is None:
        print(f"error: {files.url}: {problem or 'no such cache directory'}", file=sys.stderr)
        return 1
    print(json.dumps(manifest, indent=2, sort_keys=True))
    print(json.dumps(summary(manifest), indent=2))
    problems = verify(files)
    n_files = len(all_files(manifest))
    for line in problems:
        print(f"BAD: {line}")
    print(f"{n_files - len(problems)}/{n_files} files match the sizes and sha256 in {files.where(MANIFEST)}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="saelab-cache", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    builder = commands.add_parser("build", help="build a cache without training")
    builder.add_argument("--shard", metavar="I/N", help="build only worker I's share of the shards (of N workers); "
                         "publish with --finish once every worker is done")
    builder.add_argument("--finish", action="store_true", help="publish the manifest of a cache the --shard "
                         "workers built")
    builder.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides, as for saelab-train")
    lister = commands.add_parser("list", help="list caches")
    lister.add_argument("--cache-dir", help="the directory holding caches (default: paths.cache_dir)")
    commands.add_parser("inspect", help="print a manifest and verify checksums").add_argument("dir")
    cache_export.add_parser(commands)  # export --format saelens SRC DEST (saelab/cli/cache_export.py)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        if args.command == "build":
            code = build(args.overrides, args.shard, args.finish)
        elif args.command == "list":
            code = list_caches(args.cache_dir)
        elif args.command == "export":
            code = cache_export.run(args)
        else:
            code = inspect(args.dir)
    except Exception as err:
        code = bad_input_exit(err)
    sys.exit(code)


if __name__ == "__main__":
    main()
