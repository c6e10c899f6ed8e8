"""SAELens's cached-activations format, both ways (issue #34): `data=saelens_cache` reads a cache SAELens wrote (the
fixture: written by SAELens's CacheActivationsRunner, with what SAELens's own ActivationsStore reads from it,
scripts/saelens_compat/make_cache_fixture.py), trains on it and saelab-eval evaluates on it; bad input fails in one
line; and `saelab-cache export --format saelens` writes a cache SAELens's ActivationsStore reads as exactly saelab's
activations (checked in SAELens itself, in its own venv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from safetensors.numpy import load_file

from saelab.data.saelens_cache import SAELensCache, write_saelens_cache
from saelab.data.saelens_cache_datamodule import SAELensCacheDataModule, held_out
from saelab.data.sources.saelens_cache import SAELensCacheSource
from tests.conftest import REPO, run_cli, run_module, tiny_overrides

FIXTURE = REPO / "tests" / "fixtures" / "saelens_cache"
CACHE = FIXTURE / "cache"
HOOK, CTX, D, WINDOWS, PER_FILE = "blocks.0.hook_resid_post", 16, 32, 48, 16  # make_cache_fixture.py's
SAELENS_VENV = Path(os.environ.get("SAELENS_VENV", Path.home() / ".cache" / "saelab" / "saelens-venv"))


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURE / "expected.safetensors"))


def datamodule(excluded, eval_fraction: float = 0.1, location: str | Path = CACHE, **cfg) -> SAELensCacheDataModule:
    data_cfg = {"eval_fraction": eval_fraction, "normalize": "unit_mean_squared_norm", "normalize_tokens": 256,
                "batch_size": 32, "buffer_tokens": 128, "seed": 0, **cfg}
    return SAELensCacheDataModule(data_cfg, 64, 0, [HOOK], SAELensCache.open(location), frozenset(excluded))


def positions(expected, excluded, windows: np.ndarray) -> np.ndarray:
    """SAELens's unfiltered activations of the chosen windows (a bool mask over the 48), excluded ids dropped."""
    acts = expected["all_activations"].reshape(WINDOWS, CTX, D)[windows]
    return acts[~np.isin(expected["token_ids"][windows], list(excluded))]


def test_the_cache_saelens_wrote_reads_as_saelens_reads_it(expected):
    cache = SAELensCache.open(CACHE)
    assert cache.hooks == {HOOK: (CTX, D)} and cache.has_token_ids and len(cache.files) == 3
    parts = list(cache.windows(HOOK, chunk_bytes=5 * CTX * D * 4))  # 5 windows at a time: record batches sliced
    assert [p.start for p in parts if p.file == 1] == [0, 5, 10, 15]
    np.testing.assert_array_equal(np.concatenate([p.activations for p in parts]).reshape(-1, D),
                                  expected["all_activations"])
    np.testing.assert_array_equal(np.concatenate([p.token_ids for p in parts]), expected["token_ids"])
    # With nothing held out (1/f beyond a file's 16 windows), the rows are the whole stream, as SAELens yields it
    # with exclude_special_tokens=[0, 1] (saelab's set) and with [0] (its True here: BOS/EOS only).
    for excluded, key in (([0, 1], "activations"), ([0], "bos_only"), ([], "all_activations")):
        rows = np.concatenate(list(datamodule(excluded, eval_fraction=0.05).rows(HOOK, held=False)))
        np.testing.assert_array_equal(rows, expected[key])
    assert (expected["token_ids"] == 1).any() and len(expected["activations"]) < len(expected["bos_only"])


def test_held_out_windows_are_every_1_over_f_th_of_each_file_whatever_the_order(expected):
    module = datamodule([0, 1], eval_fraction=0.25)
    held = held_out(np.arange(WINDOWS) % PER_FILE, 0.25)
    assert held.sum() == 12 and list(np.flatnonzero(held[:PER_FILE])) == [3, 7, 11, 15]
    np.testing.assert_array_equal(np.concatenate(list(module.rows(HOOK, held=True))), positions(expected, [0, 1], held))
    np.testing.assert_array_equal(np.concatenate(list(module.rows(HOOK, held=False))),
                                  positions(expected, [0, 1], ~held))
    by_file = [positions(expected, [0, 1], ~held & (np.arange(WINDOWS) // PER_FILE == f)) for f in range(3)]
    np.testing.assert_array_equal(np.concatenate(list(module.rows(HOOK, held=False, files=[2, 0, 1]))),
                                  np.concatenate([by_file[2], by_file[0], by_file[1]]))
    module.setup()
    raw_eval = positions(expected, [0, 1], held)[:64]
    np.testing.assert_allclose(module.eval_acts[HOOK].numpy() * module.scales[HOOK], raw_eval, rtol=1e-6)
    head = positions(expected, [0, 1], ~held)[:256].astype(np.float64)
    assert module.scales[HOOK] == pytest.approx(np.sqrt((head**2).sum(1).mean()), rel=1e-9)
    batch = next(iter(module.train_dataloader()))[HOOK]
    assert batch.shape == (32, D)
    train = positions(expected, [0, 1], ~held) / module.scales[HOOK]
    for row in batch.numpy():  # every training row is a training position, never a held-out one
        assert np.isclose(train, row, rtol=1e-6).all(1).any()


def test_model_excludes_the_ids_saelabs_own_stream_excludes(tiny_model_dir, expected):
    from transformers import AutoTokenizer

    from saelab.data.tokens import SpecialTokens

    source = SAELensCacheSource({"source": "saelens_cache", "path": str(CACHE), "hook": HOOK, "d_in": D,
                                 "exclude_token_ids": "model", "tokenizer": {"path": str(tiny_model_dir)}})
    source.check()
    own = SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir)).excluded
    assert source.excluded_ids() == own == set(expected["excluded_token_ids"].tolist())
    assert source.d_in == D and source.hooks({}) == [HOOK]


def test_the_composed_source_gives_a_stream_datamodule(tiny_model_dir):
    """data=saelens_cache as the YAML composes it (hook, width and tokenizer from the model section): a datamodule
    with every member run/ reads (data/protocol.StreamDataModule)."""
    from saelab.data.protocol import StreamDataModule
    from saelab.data.sources import build_source
    from saelab.run.compose import compose_run_config
    from tests.test_datamodule_protocol import protocol_members

    cfg = compose_run_config(["data=saelens_cache", f"data.path={CACHE}", "model=tiny", f"model.path={tiny_model_dir}",
                              f"model.hook={HOOK}", "data.normalize_tokens=256", "data.normalize=sqrt_d_model",
                              "data.eval_fraction=0.25"])
    source = build_source(cfg.data)
    assert not source.needs_model and source.d_in == D == cfg.sae.d_in and source.excluded_ids() == {0, 1}
    module = source.datamodule(cfg.data, None, 128, 0, cache_dir=None, train_tokens=None, hooks=source.hooks(cfg.model))
    module.setup()
    assert isinstance(module, StreamDataModule) and all(hasattr(module, name) for name in protocol_members())
    assert set(module.scales) == set(module.input_rms) == set(module.eval_acts) == {HOOK}
    assert module.eval_acts[HOOK].shape == (128, D) and module.input_rms[HOOK] > 0
    assert module.eval_firing is None and module.eval_windows is None and module.special is None
    assert {"batches_consumed", "scales"} <= set(module.state_dict())


def test_a_cache_at_an_fsspec_url_reads_and_writes_like_a_local_one(expected):
    fs = fsspec.filesystem("memory")
    fs.put(str(CACHE), "/saelens-fixture", recursive=True)
    try:
        local, remote = datamodule([0, 1]), datamodule([0, 1], location="memory://saelens-fixture")
        for held in (False, True):
            np.testing.assert_array_equal(np.concatenate(list(remote.rows(HOOK, held=held))),
                                          np.concatenate(list(local.rows(HOOK, held=held))))
        remote.setup()
        local.setup()
        assert remote.scales == local.scales
        cache = SAELensCache.open(CACHE)
        parts = list(cache.windows(HOOK))
        written = write_saelens_cache("memory://saelens-copy", HOOK, CTX, D, WINDOWS,
                                      ((p.activations, p.token_ids) for p in parts), windows_per_file=20)
        copy = SAELensCache.open("memory://saelens-copy")
        assert written == WINDOWS and len(copy.files) == 3  # 20 + 20 + 8
        np.testing.assert_array_equal(np.concatenate([p.activations for p in copy.windows(HOOK)]).reshape(-1, D),
                                      expected["all_activations"])
    finally:
        for path in ("/saelens-fixture", "/saelens-copy"):
            if fs.exists(path):
                fs.rm(path, recursive=True)


def test_a_cache_pushed_to_the_hub_as_parquet_reads_the_same(expected, tmp_path):
    """push_to_hub's layout (what SAELens's hf_repo_id uploads): parquet files under data/, read row group by row
    group, equal to the saved directory."""
    from datasets import Dataset

    pushed = tmp_path / "pushed"
    (pushed / "data").mkdir(parents=True)
    Dataset.load_from_disk(str(CACHE)).to_parquet(str(pushed / "data" / "train-00000-of-00001.parquet"), batch_size=7)
    cache = SAELensCache.open(pushed)
    assert cache.hooks == {HOOK: (CTX, D)} and cache.files == ("data/train-00000-of-00001.parquet",)
    rows = np.concatenate(list(datamodule([0, 1], eval_fraction=0.01, location=pushed).rows(HOOK, held=False)))
    np.testing.assert_array_equal(rows, expected["activations"])


def overrides(tiny_model_dir: Path, out: Path, *extra: str) -> list[str]:
    """saelab-train on the fixture with tiny budgets (a few seconds)."""
    return ["data=saelens_cache", f"data.path={CACHE}", "model=tiny", f"model.path={tiny_model_dir}",
            f"model.hook={HOOK}", "data.batch_size=64", "data.buffer_tokens=256", "data.train_tokens=2048",
            "data.normalize_tokens=256", "eval.tokens=512", "eval.batch_size=256", "sae.expansion_factor=2",
            "logger=csv", f"paths.output_dir={out}", "callbacks.progress_bar.refresh_rate=0", *extra]


def test_train_on_the_saelens_cache_then_saelab_eval_evaluates_it(tiny_model_dir, tmp_path):
    result = run_cli(overrides(tiny_model_dir, tmp_path / "out"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "out").rglob("metrics.json")
    run_dir, metrics = metrics_file.parent, json.loads(metrics_file.read_text())
    assert metrics["steps"] == 32 and 0 < metrics["fvu"] < 1 and metrics["l0"] > 0
    assert json.loads((run_dir / "sae" / "cfg.json").read_text())["metadata"]["hook_name"] == HOOK
    evaluated = run_module("saelab.cli.evaluate", [str(run_dir / "sae"), "data=saelens_cache", f"data.path={CACHE}",
                                                   "model=tiny", f"model.path={tiny_model_dir}", "eval.tokens=512",
                                                   "--out", str(tmp_path / "eval")], timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["hook_name"] == HOOK and again["tokens"] == metrics["tokens"] == 45  # the 3 held-out windows
    for name in ("fvu", "l0", "explained_variance", "cosine"):
        assert again[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-6), name


def _no_token_ids_cache(directory: Path) -> Path:
    from datasets import Array2D, Dataset, Features

    features = Features({HOOK: Array2D(shape=(CTX, D), dtype="float32")})
    Dataset.from_dict({HOOK: np.zeros((4, CTX, D), np.float32)}, features=features).save_to_disk(str(directory))
    return directory


BAD = [  # (overrides, the one line's start; the field, the value and what is allowed)
    (["model.hook=blocks.0.hook_out"], "data.hook='blocks.0.hook_out' is not allowed: expected the cache's hook "
     f"column ({HOOK}"),
    (["data.d_in=16"], "data.d_in=16 is not allowed: expected the cache's d_in (32 at"),
    (["data.path=/nonexistent/saelens"], "data.path='/nonexistent/saelens' is not allowed: expected a directory or URL "
     "holding a SAELens activation cache, as CacheActivationsRunner writes it (no such directory)"),
    (["data.path={not_a_cache}"], "is not allowed: expected a directory or URL holding a SAELens activation cache, as "
     "CacheActivationsRunner writes it (no dataset_info.json there"),
    (["data.exclude_token_ids=bos"], "data.exclude_token_ids='bos' is not allowed: expected model (the special ids"),
    (["data.exclude_token_ids=[-1]"], "data.exclude_token_ids=[-1] is not allowed: expected model"),
    (["data.path={no_token_ids}"], "data.exclude_token_ids='model' is not allowed: expected [] for a cache without a "
     "token_ids column"),
    (["data.tokenizer.path={not_a_cache}"],
     "data.exclude_token_ids='model' is not allowed: expected model (the special"),
]


@pytest.fixture(scope="module")
def bad_results(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Every BAD case through saelab.cli.train.main() in one subprocess (tests/cli_batch.py, as test_cli.py's)."""
    root = tmp_path_factory.mktemp("saelens_bad")
    (root / "not-a-cache").mkdir()
    (root / "not-a-cache" / "notes.txt").write_text("no cache here")
    names = {"not_a_cache": root / "not-a-cache", "no_token_ids": _no_token_ids_cache(root / "no-token-ids")}
    cases = [overrides(tiny_model_dir, root / f"case{i}", *[o.format(**names) for o in bad])
             for i, (bad, _) in enumerate(BAD)]
    (root / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-m", "tests.cli_batch", str(root / "cases.json"), str(root / "results.json")],
                   cwd=REPO, check=True, timeout=600, env={**os.environ})
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.parametrize(("index", "message"), [(i, b[1]) for i, b in enumerate(BAD)], ids=[b[0][0] for b in BAD])
def test_bad_input_fails_before_training_with_one_line(index, message, bad_results):
    root, results = bad_results
    result = results[index]
    assert result["code"] == 2, result["stderr"][-2000:]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result["stderr"][-2000:]
    assert not list((root / f"case{index}").rglob("*"))  # nothing trained: no file, no run or date directory


# -- saelab's cache exported, read back by saelab and by SAELens ---------------------------------------------------
@pytest.fixture(scope="module")
def saelab_cache(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> Path:
    """A saelab cache of the tiny model (its train stream a prefix of whole shards: data.train_tokens is small)."""
    root = tmp_path_factory.mktemp("saelab_cache")
    result = run_module("saelab.cli.cache", ["build", *tiny_overrides(tiny_model_dir, tiny_corpus_dir, root / "out"),
                                             "data.train_tokens=2048", f"paths.cache_dir={root / 'caches'}"],
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def export(source: Path, dest: Path | str, *extra: str) -> subprocess.CompletedProcess:
    return run_module("saelab.cli.cache", ["export", "--format", "saelens", *extra, str(source), str(dest)])


@pytest.mark.parametrize("stream", ["train", "eval"])
def test_the_export_lays_saelabs_rows_into_saelens_windows(saelab_cache, tmp_path, stream):
    from saelab.data.cache import read_cache

    result = export(saelab_cache, tmp_path / "export", "--stream", stream, "--windows-per-file", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    contents = read_cache(saelab_cache)
    rows = np.concatenate(list(contents.rows(stream)))
    sidecar = json.loads((tmp_path / "export" / "saelab_export.json").read_text())
    excluded = sidecar["saelens"]["exclude_special_tokens"]
    assert excluded == sorted(contents.manifest["inputs"]["special_tokens"]["excluded"]) and excluded
    exported = SAELensCache.open(tmp_path / "export")
    hook = contents.manifest["inputs"]["hook"]
    assert exported.hooks == {hook: (contents.manifest["context_size"], contents.manifest["d_model"])}
    parts = list(exported.windows(hook))
    acts, ids = np.concatenate([p.activations for p in parts]), np.concatenate([p.token_ids for p in parts])
    special = np.isin(ids, excluded)
    assert len(acts) == sidecar["windows"] and special.any()
    np.testing.assert_array_equal(ids, contents.windows(stream)[: len(ids)])  # saelab's windows, in its order
    np.testing.assert_array_equal(acts[~special], rows)  # saelab's rows, exactly, at the positions it kept
    assert not acts[special].any()  # zeros where saelab computed nothing
    assert len(exported.files) == -(-len(ids) // 100)


def test_export_refuses_a_used_destination_and_a_non_cache(saelab_cache, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    for source, dest, message in ((saelab_cache, tmp_path / "used", "dest="), (tmp_path / "used", tmp_path / "new",
                                                                              "cache=")):
        result = export(source, dest)
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: {message}"), errors
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def saelens_python() -> Path:
    """The python of SAELens's own venv (scripts/saelens_compat/venv.sh makes it on first use: minutes, needs PyPI)."""
    python = SAELENS_VENV / "bin" / "python"

    def imports() -> bool:
        return python.exists() and subprocess.run([str(python), "-c", "import sae_lens"], capture_output=True,
                                                  timeout=300).returncode == 0

    if not imports():
        try:
            subprocess.run(["bash", "-c", "source scripts/saelens_compat/venv.sh"], cwd=REPO, capture_output=True,
                           timeout=1200, env={**os.environ, "SAELENS_VENV": str(SAELENS_VENV)})
        except subprocess.TimeoutExpired:
            pytest.skip(f"SAELens's venv ({SAELENS_VENV}) could not be made in 20 minutes: skipped SAELens's read")
        if not imports():
            pytest.skip(f"SAELens's venv ({SAELENS_VENV}) could not be made (no PyPI?): skipped SAELens's read")
    return python


def test_saelens_reads_saelabs_export_as_exactly_saelabs_activations(saelab_cache, saelens_python, tmp_path):
    from saelab.data.cache import read_cache

    assert export(saelab_cache, tmp_path / "export").returncode == 0
    read = subprocess.run([str(saelens_python), "scripts/saelens_compat/read_cache_in_saelens.py",
                           str(tmp_path / "export"), str(tmp_path / "read.safetensors")], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert read.returncode == 0, read.stderr[-3000:]
    report = json.loads(read.stdout.strip().splitlines()[-1])
    rows = np.concatenate(list(read_cache(saelab_cache).rows("train")))
    assert report["rows"] == len(rows) and report["exclude_special_tokens"]
    np.testing.assert_array_equal(load_file(str(tmp_path / "read.safetensors"))["activations"], rows)


def test_the_saelens_read_benchmark_reports_one_json_line(saelens_python):
    result = subprocess.run([str(saelens_python), "benchmarks/saelens_cache_read.py", str(CACHE), "--seconds", "0.5",
                             "--warmup", "0.1", "--batch-size", "64", "--store-batch", "4", "--exclude", "0,1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = result.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["hook"] == HOOK and report["d_in"] == D and report["exclude_special_tokens"] == [0, 1]
    assert report["activations"] > 0 and report["activations"] % 64 == 0
    assert report["gb_per_s"] == pytest.approx(report["activations_per_s"] * D * 4 / 1e9)
