"""The activation store beyond one local float32 directory: storage dtypes, fsspec locations (memory:// here; a real
S3 server in test_s3_cache.py), many builders, one forward for several hooks, bounded read-ahead."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import torch

from saelab.data import cache as cache_module
from saelab.data.cache import ActivationCache, build_share, finish, open_caches, read_cache
from saelab.data.cache_manifest import MANIFEST, Request
from saelab.data.cache_store import Store
from saelab.errors import ConfigError
from tests.test_cache import CTX, INPUTS, WINDOWS, D, FakeModel, no_windows, request


def make(root, inputs=INPUTS) -> ActivationCache:
    return ActivationCache(root, inputs, D, shard_windows=50)


def build(root, inputs=INPUTS, req: Request | None = None, model: FakeModel | None = None):
    cache = make(root, inputs)
    return cache, open_caches({cache.hook: cache}, req or request(), lambda: WINDOWS, model or FakeModel())[cache.hook]


def epoch(reader, seed: int = 0, group_tokens: int = 1000) -> torch.Tensor:
    return torch.cat(list(reader.epoch(torch.Generator().manual_seed(seed), group_tokens)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_cache_stores_half_the_bytes_and_reads_back_float32_rounded_once(tmp_path, dtype):
    _, exact = build(tmp_path / "f32")
    cache, half = build(tmp_path / dtype, {**INPUTS, "cache_dtype": dtype})
    assert cache.name != make(tmp_path / "f32").name  # the storage dtype is part of the key
    assert half.manifest["dtype"] == dtype
    for a, b in zip(exact.train, half.train, strict=True):
        payload = (a.entry["bytes"] - 128, b.entry["bytes"] - 128)  # .npy headers are 128 bytes
        assert payload[1] * 2 == payload[0]
    rows, rounded = epoch(exact), epoch(half)
    assert rounded.dtype == torch.float32
    # The stream is the float32 one rounded to the storage dtype once (IEEE round-to-nearest-even, torch's cast).
    assert torch.equal(rounded, rows.to(getattr(torch, dtype)).float())
    assert not torch.equal(rounded, rows)  # the tokens' values (ids / 7, ...) are not all exact in 16 bits
    assert torch.equal(half.eval_activations(300), exact.eval_activations(300).to(getattr(torch, dtype)).float())
    with pytest.raises(ConfigError, match=r"data.cache_dtype='int8' is not allowed: expected one of 'float32'"):
        make(tmp_path, {**INPUTS, "cache_dtype": "int8"})


def test_two_workers_build_shard_for_shard_the_cache_one_process_builds(tmp_path):
    _, single = build(tmp_path / "one")
    two = make(tmp_path / "two")
    caches = {two.hook: two}
    assert build_share(caches, request(), WINDOWS, FakeModel(), 0, 2) == 2  # train 0, train 2 (of train 0-2, eval 0)
    missing = r"all built \(2 not yet: train-00001.npy, eval-00000.npy; run the builders"
    with pytest.raises(ConfigError, match=rf"^--finish=.*{missing}"):
        finish(caches, request())
    assert not (two.path / MANIFEST).exists()  # nothing published before every shard is there
    assert build_share(caches, request(), WINDOWS, FakeModel(), 1, 2) == 2
    finish(caches, request())
    one, both = read_cache(tmp_path / "one" / two.name), read_cache(two.location)
    assert one.manifest["streams"] == both.manifest["streams"]  # same files, rows, sizes and sha256s
    assert sorted(p.name for p in two.path.glob("*.npy")) == sorted(p.name for p in (tmp_path / "one" / two.name
                                                                                         ).glob("*.npy"))
    for path in two.path.glob("*.npy"):
        assert path.read_bytes() == (tmp_path / "one" / two.name / path.name).read_bytes(), path.name
    # The finished cache is read like any other: no forward, no text.
    reused = open_caches({two.hook: make(tmp_path / "two")}, request(), no_windows, FakeModel())[two.hook]
    assert torch.equal(epoch(reused), epoch(single))


def test_one_forward_pass_fills_every_hooks_cache(tmp_path):
    hooks = {h: make(tmp_path, {**INPUTS, "hook": h}) for h in ("blocks.0.hook_out", "blocks.1.hook_out")}
    together = FakeModel()
    readers = open_caches(hooks, request(), lambda: WINDOWS, together)
    alone = FakeModel()
    build(tmp_path / "alone", model=alone)
    assert together.windows_run == alone.windows_run > 0  # two caches, the windows run once
    first, second = (epoch(readers[h]) for h in hooks)
    assert torch.equal(first, second)  # the fake model's hooks agree, and both streams draw the same order


def test_a_cache_at_an_fsspec_url_builds_reads_and_refuses_damage(tmp_path):
    url = f"memory://saelab-{uuid.uuid4().hex}/caches"
    cache, remote = build(url)
    _, local = build(tmp_path)
    assert cache.path is None and cache.location == f"{url}/{cache.name}"
    assert torch.equal(epoch(remote), epoch(local)) and remote.scale == local.scale
    assert torch.equal(remote.eval_windows, WINDOWS["eval"])
    reused = open_caches({cache.hook: make(url)}, request(), no_windows, FakeModel())[cache.hook]
    assert torch.equal(epoch(reused), epoch(local))
    files = Store(cache.location)
    shard = reused.train[1].entry["file"]
    data = bytearray(files.read_bytes(shard))
    data[-3] ^= 0xFF  # same size: only the checksum can tell
    files.write_bytes(shard, bytes(data))
    damaged = open_caches({cache.hook: make(url)}, request(), no_windows, FakeModel())[cache.hook]
    with pytest.raises(ConfigError, match=rf"{shard} fails its sha256 checksum as fetched; its rows were not used"):
        epoch(damaged)
    files.remove(shard)  # deleted remotely: refused before anything is read, and not rebuilt under other readers
    with pytest.raises(ConfigError, match=rf"^data.cache='{url}' is not allowed: expected an intact cache \(.*"
                                          rf"{shard} is missing; delete that cache to rebuild it"):
        open_caches({cache.hook: make(url)}, request(), no_windows, FakeModel())
    assert not files.exists(shard)


def test_finishing_is_refused_while_another_step_holds_the_cache(tmp_path):
    url = f"memory://saelab-{uuid.uuid4().hex}/caches"
    cache = make(url)
    build_share({cache.hook: cache}, request(), WINDOWS, FakeModel(), 0, 1)
    store = Store(url)
    store.write_json(f"{cache.name}.lock", {"owner": "another", "renewed": time.time()})  # a live lease
    with pytest.raises(ConfigError, match=r"^--finish=.* one finishing step at a time \(another step holds "):
        finish({cache.hook: cache}, request())
    store.write_json(f"{cache.name}.lock", {"owner": "dead", "renewed": time.time() - 3600})  # not renewed: stale
    finish({cache.hook: cache}, request())
    assert Store(cache.location).exists(MANIFEST) and not store.exists(f"{cache.name}.lock")


def test_read_ahead_runs_ahead_of_training_and_no_further(tmp_path, monkeypatch):
    _, reader = build(tmp_path, req=request(train_tokens=10**9))  # 12 shards of 400 rows
    fetched, lock = [], threading.Lock()
    original = cache_module.Shard.stored

    def counted(shard):
        with lock:
            fetched.append(shard.entry["file"])
        return original(shard)

    monkeypatch.setattr(cache_module.Shard, "stored", counted)
    groups = reader.epoch(torch.Generator().manual_seed(0), group_tokens=0)  # one shard a group
    first = next(groups)
    time.sleep(0.5)  # the background threads have had time to fetch as far as they may
    assert len(first) == 400
    assert len(fetched) == 1 + cache_module.READ_AHEAD  # the group consumed and READ_AHEAD more, not all 12
    rest = list(groups)
    assert len(rest) == 11 and len(fetched) == 12
    rows = torch.cat([first, *rest])
    assert sorted(rows[:, 0].tolist()) == sorted(torch.arange(600 * CTX).float().tolist())


def test_a_16_bit_rounding_reference_from_the_format_itself():
    """The bfloat16 encoding keeps float32's top 16 bits, rounded to nearest even (the format's definition)."""
    values = torch.tensor([1.0, 1 / 3, -2.5e-3, 65504.0, 3.0e38])
    stored = cache_module.encode(values, "bfloat16")
    bits = values.numpy().view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round half to even
    assert np.array_equal(stored, rounded)
    assert torch.equal(cache_module.decode(stored, "bfloat16"),
                       torch.from_numpy((rounded.astype(np.uint32) << 16).view(np.float32)))


def test_a_corpus_that_changed_under_the_same_key_rebuilds_a_local_cache_and_refuses_a_remote_one(tmp_path, caplog):
    """A hub dataset's new revision keeps the key but not the windows: the recorded plan tells them apart."""
    changed = {"train": WINDOWS["train"] + 7, "eval": WINDOWS["eval"]}
    cache, _ = build(tmp_path, req=request(train_tokens=700))
    bigger = request(train_tokens=2500)  # the budget grew: the cache must be extended, from the corpus as it is now
    reader = open_caches({cache.hook: make(tmp_path)}, bigger, lambda: changed, FakeModel())[cache.hook]
    assert "(its token windows differ from the corpus's now); rebuilding it" in caplog.text
    first = reader.train[0].rows()[:, 0]
    assert set(first.long().tolist()) <= set((changed["train"].flatten()).tolist())
    url = f"memory://saelab-{uuid.uuid4().hex}/caches"
    build(url, req=request(train_tokens=700))
    with pytest.raises(ConfigError, match=r"records another pass: the corpus or the shard size changed"):
        open_caches({cache.hook: make(url)}, bigger, lambda: changed, FakeModel())
