"""The on-disk activation cache: built once, reused with no forward, damage detected, every row read."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelab.data.cache import ActivationCache, open_caches
from saelab.data.cache_key import ModelSpec, cache_name, cache_store, key_inputs
from saelab.data.cache_manifest import MANIFEST, Request
from saelab.data.cache_manifest import verify as verify_files
from saelab.data.cache_store import Store
from saelab.data.sources import build_source
from saelab.data.tokens import SpecialTokens
from saelab.errors import ConfigError
from tests.conftest import REPO, run_cli, tiny_overrides

D, CTX = 4, 8
INPUTS = {"model": "fake/model", "hook": "blocks.0.hook_out", "source": {"source": "fake"}}
# 600 train windows of distinct token ids (4800 activations), 50 windows (400 activations) a shard: 12 shards.
WINDOWS = {"train": torch.arange(600 * CTX).view(600, CTX),
           "eval": 10**5 + torch.arange(60 * CTX).view(60, CTX)}
TEXT_FILES = "saelab.data.sources.text_files.TextFiles"  # data._target_ of data=text_files
PYDOCS = "saelab.data.sources.pydocs.PyDocs"


class FakeModel:
    """Activations that identify their token (row = f(token id)); counts the windows it is run on."""

    def __init__(self):
        self.windows_run = 0

    def __call__(self, windows: torch.Tensor, hooks: list[str]):
        self.windows_run += len(windows)
        for start in range(0, len(windows), 16):
            ids = windows[start : start + 16].flatten().float()
            yield dict.fromkeys(hooks, torch.stack([ids, ids / 7, -ids, ids % 5], dim=-1))


def request(train_tokens: int = 1000, eval_tokens: int = 300) -> Request:
    return Request(train_tokens, eval_tokens, "unit_mean_squared_norm", 256)


def open_cache(root: Path, req: Request | None = None, model: FakeModel | None = None):
    cache = ActivationCache(root, INPUTS, D, shard_windows=50)
    readers = open_caches({cache.hook: cache}, req or request(), lambda: WINDOWS, model or FakeModel())
    return cache, readers[cache.hook]


def verify(path: Path) -> list[str]:
    return verify_files(Store(path))


def no_windows():
    raise AssertionError("a reused cache must not load text")


def test_built_once_then_reused_with_no_generation(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="saelab.data.cache")
    model = FakeModel()
    first, reader = open_cache(tmp_path, model=model)
    assert first.shards_written > 0 and model.windows_run > 0
    assert "building" in caplog.text
    again = ActivationCache(tmp_path, INPUTS, D, shard_windows=50)
    unused = FakeModel()
    reread = open_caches({again.hook: again}, request(), no_windows, unused)[again.hook]
    assert again.shards_written == 0 and unused.windows_run == 0 and "reusing" in caplog.text
    assert reread.scale == reader.scale
    assert torch.equal(reread.eval_activations(300), reader.eval_activations(300))
    # The held-out activations are the first eval windows in corpus order, like the uncached stream.
    assert torch.equal(reader.eval_activations(300)[:, 0], WINDOWS["eval"].flatten()[:300].float())
    assert torch.equal(reread.eval_windows, WINDOWS["eval"])
    # The budget (1000) is read as the shortest prefix of whole shards: 3 x 400 activations.
    assert reader.train_tokens == 1200
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["inputs"] == INPUTS and manifest["dtype"] == "float32" and manifest["d_model"] == D
    assert manifest["scales"] == {"unit_mean_squared_norm/256": reader.scale}
    assert verify(first.path) == []


def test_an_epoch_reads_every_cached_activation_exactly_once_shuffled(tmp_path):
    _, reader = open_cache(tmp_path, request(train_tokens=10**9))  # more than the corpus: the whole pass
    stored = torch.cat([s.rows() for s in reader.train])
    assert len(stored) == 600 * CTX and len(reader.train) == 12
    generator = torch.Generator().manual_seed(0)
    for group_tokens in (0, 1000):  # one shard at a time; groups of 3 shards permuted together
        groups = list(reader.epoch(generator, group_tokens))
        assert len(groups) == (12 if group_tokens == 0 else 4)
        epochs = [torch.cat(groups), torch.cat(list(reader.epoch(generator, group_tokens)))]
        for epoch in epochs:
            assert sorted(epoch[:, 0].tolist()) == list(range(600 * CTX))  # every token once, none twice
            assert not torch.equal(epoch, stored)
        assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
        # Shards come in a shuffled order, each group is permuted: no run of consecutive tokens.
        assert (epochs[0][:256, 0].diff().abs() == 1).float().mean() < 0.05
    # The stored train stream is a seeded permutation of the windows, not the corpus order.
    assert not torch.equal(stored[:, 0], torch.arange(600 * CTX).float())
    # Batches run over epochs: 18 full batches (4608 of 4800 rows) before any activation repeats.
    batches = [b for _, b in zip(range(37), reader.batches(generator, 256, 1000), strict=False)]
    assert all(b.shape == (256, D) for b in batches)
    first_epoch = torch.cat(batches[:18])[:, 0]
    assert len(set(first_epoch.tolist())) == 18 * 256
    counts = torch.bincount(torch.cat(batches)[:, 0].long())
    assert counts.max() == 2


def test_a_larger_budget_extends_the_cache_and_keeps_its_shards(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="saelab.data.cache")
    cache, small = open_cache(tmp_path, request(train_tokens=700))
    sha = {p.name: p.read_bytes() for p in cache.path.glob("train-0*.npy")}
    assert len(sha) == 2
    bigger, large = open_cache(tmp_path, request(train_tokens=2500))
    assert "extending" in caplog.text and bigger.shards_written == 5  # train shards 2..6
    assert all((cache.path / name).read_bytes() == data for name, data in sha.items())
    assert large.train_tokens == 7 * 400 and small.train_tokens == 2 * 400
    # A small-budget run reads the same prefix however far the cache has grown.
    _, small_again = open_cache(tmp_path, request(train_tokens=700))
    assert all(torch.equal(a.rows(), b.rows()) for a, b in zip(small.train, small_again.train, strict=True))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


DAMAGE = {
    "flipped bytes": (lambda d: _flip(d / "train-00001.npy"), "fails its sha256"),
    "truncated shard": (lambda d: _truncate(d / "eval-00000.npy"), "bytes, expected"),
    "missing shard": (lambda d: (d / "train-00000.npy").unlink(), "is missing"),
    "flipped eval windows": (lambda d: _flip(d / "eval-windows.npy"), "fails its sha256"),
    "garbled manifest": (lambda d: (d / MANIFEST).write_text('{"format": 2, "stre'), "unreadable manifest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog, damage):
    cache, original = open_cache(tmp_path)
    expected = torch.cat(list(original.epoch(torch.Generator().manual_seed(0), 1000)))
    harm, message = DAMAGE[damage]
    harm(cache.path)
    assert verify(cache.path) != []
    caplog.set_level(logging.WARNING, logger="saelab.data.cache")
    rebuilt, reader = open_cache(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and message in warnings[0] and "rebuilding" in warnings[0], warnings
    assert rebuilt.shards_written > 0 and verify(rebuilt.path) == []
    assert torch.equal(torch.cat(list(reader.epoch(torch.Generator().manual_seed(0), 1000))), expected)


def test_an_interrupted_build_is_never_read_and_the_next_build_keeps_its_finished_shards(tmp_path):
    class Crash(FakeModel):
        def __call__(self, windows, hooks):
            if self.windows_run >= 100:
                raise KeyboardInterrupt
            yield from super().__call__(windows, hooks)

    with pytest.raises(KeyboardInterrupt):
        open_cache(tmp_path, model=Crash())
    cache = ActivationCache(tmp_path, INPUTS, D, shard_windows=50)
    assert not (cache.path / MANIFEST).exists()  # nothing published: no run reads it
    assert verify(cache.path) == ["no manifest.json (a build not finished)"]
    finished = sorted(p.name for p in cache.path.glob("*-0*.npy"))
    # The train shards come first (3 x 50 windows for 1000 activations), then the held-out one; the model died
    # at its third call: train shards 0 and 1 are finished.
    assert finished == ["train-00000.npy", "train-00001.npy"]
    first_run = {name: (cache.path / name).read_bytes() for name in finished}
    model = FakeModel()
    _, reader = open_cache(tmp_path, model=model)
    assert verify(cache.path) == []
    assert model.windows_run == 50 + 50  # train shard 2 and held-out shard 0 only: the finished ones were kept
    assert all((cache.path / n).read_bytes() == data for n, data in first_run.items())
    _, fresh = open_cache(tmp_path / "fresh")  # the same cache built in one go
    assert all(torch.equal(a.rows(), b.rows()) for a, b in zip(reader.train, fresh.train, strict=True))
    assert len(reader.train) == 3


def test_the_key_follows_what_decides_the_activations_and_nothing_else(tmp_path):
    model_dir, corpus = tmp_path / "model", tmp_path / "corpus"
    model_dir.mkdir(), corpus.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "weights.bin").write_bytes(b"\0" * (2**20 + 1))  # large: fingerprinted by size and mtime
    (corpus / "a.txt").write_text("some text")
    spec = ModelSpec("org/tiny", str(model_dir), "float32", "blocks.0.hook_out")
    special = SpecialTokens(bos=0, separator=0, excluded=frozenset({0}))
    cfg = {"_target_": TEXT_FILES, "source": "text_files", "path": str(corpus), "context_size": 32, "prepend_bos": True,
           "eval_fraction": 0.1, "train_tokens": 1000, "batch_size": 64, "model_batch_size": 8,
           "cache_dtype": "float32"}

    def name(cfg=cfg, spec=spec, special=special) -> str:
        return cache_name(key_inputs(build_source(cfg), cfg, spec, special))

    base = name()
    assert base.startswith("tiny--blocks.0.hook_out--")
    # Neither the budget nor the batch sizes decide the activations, so sweeps over them share a cache.
    assert name({**cfg, "train_tokens": 10**6, "batch_size": 4096, "model_batch_size": 64}) == base
    changed = [name({**cfg, "context_size": 64}), name({**cfg, "prepend_bos": False}),
               name({**cfg, "eval_fraction": 0.2}), name({**cfg, "_target_": PYDOCS, "source": "pydocs"}),
               name(spec=ModelSpec("org/tiny", str(model_dir), "bfloat16", "blocks.0.hook_out")),
               name(spec=ModelSpec("org/tiny", str(model_dir), "float32", "blocks.1.hook_out")),
               name(special=SpecialTokens(bos=0, separator=0, excluded=frozenset({0, 5}))),
               name({**cfg, "cache_dtype": "bfloat16"})]
    assert len(set(changed)) == len(changed) and base not in changed
    (corpus / "a.txt").write_text("other text")
    assert name() != base
    base = name()
    (model_dir / "config.json").write_text('{"n_layer": 2}')
    assert name() != base
    base = name()
    (model_dir / "weights.bin").write_bytes(b"\1" * (2**20 + 2))
    assert name() != base


def test_data_cache_setting(tmp_path):
    for off in ("off", "OFF", False, None, "none"):
        assert cache_store(off, tmp_path) is None
    assert Path(cache_store("auto", tmp_path / "auto").root) == tmp_path / "auto"
    assert Path(cache_store(str(tmp_path / "mine"), tmp_path / "auto").root) == tmp_path / "mine"
    assert cache_store("memory://caches", tmp_path).url == "memory://caches"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"data.cache=.*cannot be written"):
        cache_store(str(tmp_path / "a_file" / "caches"), tmp_path)
    with pytest.raises(ConfigError, match="data.cache=3"):
        cache_store(3, tmp_path)
    with pytest.raises(ConfigError, match=r"data.cache='nosuch://x' .* \(fsspec cannot open it: Protocol not known"):
        cache_store("nosuch://x", tmp_path)


# -- on the tiny model ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from saelab.data.model import load_model

    return load_model({"name": "tiny", "path": str(tiny_model_dir), "hook": "blocks.0.hook_out",
                       "hooks": None, "dtype": "float32", "device": "cpu"})


def _data_cfg(corpus_dir: Path, cache) -> dict:
    return {"_target_": TEXT_FILES, "source": "text_files",
            "path": str(corpus_dir), "context_size": 32, "prepend_bos": True,
            "eval_fraction": 0.1, "train_tokens": 4096, "batch_size": 256, "buffer_tokens": 2048,
            "model_batch_size": 16, "normalize": "unit_mean_squared_norm", "normalize_tokens": 1024,
            "cache": cache, "cache_dtype": "float32"}


def test_datamodule_reuses_its_cache_without_text_or_forward(tiny_model, tiny_corpus_dir, tmp_path,
                                                             monkeypatch):
    from saelab.data import activations, datamodule
    from saelab.data import cache as cache_module

    monkeypatch.setattr(cache_module, "SHARD_TOKENS", 64 * 32)  # 64 windows a shard: several shards

    def make(cache):
        data_cfg = _data_cfg(tiny_corpus_dir, cache)
        dm = datamodule.ActivationDataModule(data_cfg, tiny_model, 1024, seed=3, source=build_source(data_cfg))
        dm.setup()
        return dm

    built = make(str(tmp_path))
    streamed = make("off")
    # The cache holds exactly the held-out activations the uncached stream computes.
    hook = built.hooks[0]
    assert torch.allclose(built.eval_acts[hook] * built.scale, streamed.eval_acts[hook] * streamed.scale, atol=1e-6)
    assert streamed.cache is None and next(streamed.train_batches())[hook].shape == (256, 32)

    def forbidden(*args, **kwargs):
        raise AssertionError("a reused cache must not run the model or read text")

    monkeypatch.setattr(activations, "window_activations", forbidden)
    from saelab.data.sources.text_files import TextFiles

    monkeypatch.setattr(TextFiles, "documents", forbidden)
    reused = make(str(tmp_path))
    assert reused.scale == built.scale and torch.equal(reused.eval_acts[hook], built.eval_acts[hook])
    assert torch.equal(reused.eval_windows, streamed.eval_windows)  # for spliced metrics
    assert len(reused.cache.train) > 1 and reused.cache.train_tokens >= 4096 + 2048
    batches = [list(zip(range(5), dm.train_batches(), strict=False)) for dm in (built, reused)]
    assert all(torch.equal(a[hook], b[hook]) for (_, a), (_, b) in zip(*batches, strict=True))  # same seed, same data


# -- through the command line (subprocesses) -----------------------------------------------------------------
def _cache_build(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saelab.cli.cache", "build", *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_concurrent_jobs_build_the_cache_once_and_both_read_it(tiny_model_dir, tiny_corpus_dir, tmp_path):
    root = tmp_path / "c"
    overrides = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"), f"data.cache={root}"]
    jobs = [_cache_build(overrides) for _ in range(2)]
    logs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], logs
    assert sum(log.count("activation cache: building") for log in logs) == 1, logs
    assert sum(log.count("activation cache: reusing") for log in logs) == 1, logs
    (cache_dir,) = [p for p in root.iterdir() if p.is_dir()]
    assert all(log.strip().splitlines()[-1] == str(cache_dir) for log in logs)
    listing = subprocess.run([sys.executable, "-m", "saelab.cli.cache", "list", "--cache-dir", str(root)],
                             capture_output=True, text=True, cwd=REPO)
    assert listing.returncode == 0 and cache_dir.name in listing.stdout and "tiny" in listing.stdout
    inspected = subprocess.run([sys.executable, "-m", "saelab.cli.cache", "inspect", str(cache_dir)],
                               capture_output=True, text=True, cwd=REPO)
    assert inspected.returncode == 0 and "files match" in inspected.stdout


@pytest.mark.slow
def test_a_second_training_run_reuses_the_cache_and_gets_the_same_metrics(tiny_model_dir, tiny_corpus_dir,
                                                                           tmp_path):
    out = tmp_path / "outputs"
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "data.train_tokens=2560",
            "data.cache=auto"]
    runs = [run_cli(args) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    logs = [run.stdout + run.stderr for run in runs]
    assert "activation cache: building" in logs[0] and "activation cache: reusing" in logs[1]
    assert "activation cache: building" not in logs[1]
    metrics = [json.loads(p.read_text()) for p in sorted(out.rglob("metrics.json"))]
    assert len(metrics) == 2 and list((out / "cache").glob("tiny--blocks.0.hook_out--*"))
    for key in ("l0", "fvu", "shrinkage", "dead_fraction", "normalization_scale"):
        assert metrics[0][key] == metrics[1][key], key


@pytest.mark.slow
def test_an_unwritable_cache_dir_is_a_one_line_error(tiny_model_dir, tiny_corpus_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_cli([*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"),
                      f"data.cache={tmp_path}/a_file/cache"])
    assert result.returncode == 2
    assert f"error: data.cache='{tmp_path}/a_file/cache' is not allowed" in result.stderr
    assert "activation cache: building" not in result.stdout + result.stderr
