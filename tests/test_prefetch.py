"""The read-ahead of the uncached activation stream (saelab/data/prefetch.py, data.prefetch_batches): the model's
next forwards run in a thread while the SAEs step. It must not change the data (same batches, same order, also
across a resume), must surface the source's errors, stay within its depth, and leave no thread behind."""

from __future__ import annotations

import gc
import itertools
import threading
import time
from pathlib import Path

import pytest
import torch

from saelab.data.prefetch import THREAD_PREFIX, Prefetch
from saelab.errors import ConfigError

TEXT_FILES = "saelab.data.sources.text_files.TextFiles"


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture(autouse=True)
def no_thread_left():
    """Every test here ends with no read-ahead thread running (each stops its own)."""
    yield
    gc.collect()
    assert _wait_for(lambda: not _prefetch_threads(), 5.0), _prefetch_threads()


class Counting:
    """An iterator over 0..n-1 that counts the items taken from it, and whether it was closed."""

    def __init__(self, n: int | None = None):
        self.n, self.produced, self.closed = n, 0, False

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.n is not None and self.produced >= self.n:
            raise StopIteration
        self.produced += 1
        return self.produced - 1

    def close(self) -> None:
        self.closed = True


# -- the read-ahead alone ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 3])
def test_items_come_in_the_source_order_and_the_thread_ends_with_the_source(depth):
    source = Counting(500)
    ahead = Prefetch(source, depth)
    assert list(ahead) == list(range(500))
    assert source.closed and not _prefetch_threads()
    assert next(ahead, None) is None  # exhausted stays exhausted


@pytest.mark.parametrize("depth", [1, 3])
def test_the_producer_runs_exactly_depth_items_ahead_and_never_more(depth):
    source = Counting()
    with Prefetch(source, depth) as ahead:
        assert source.produced == 0  # nothing runs before the first item is asked for
        for taken in range(1, 8):
            assert next(ahead) == taken - 1
            # It does read ahead (up to the bound) while the consumer holds the item ...
            assert _wait_for(lambda taken=taken: source.produced == taken + depth), (source.produced, taken)
            time.sleep(0.02)
            assert source.produced == taken + depth  # ... and never past it (the item in its hands counts too)


def test_an_error_of_the_source_is_raised_in_the_consumer_at_its_position():
    def failing():
        yield from range(3)
        raise ValueError("forward failed")

    ahead = Prefetch(failing(), depth=5)  # read ahead past the failure: it still comes after items 0, 1, 2
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="forward failed"):
        next(ahead)
    assert not _prefetch_threads()
    with pytest.raises(StopIteration):
        next(ahead)


def test_closing_early_stops_the_thread_and_closes_the_source():
    source = Counting()
    ahead = Prefetch(source, 4)
    for item in ahead:
        if item == 10:
            break
    ahead.close(timeout=5.0)  # a bound, so that a close that failed to stop the thread fails here, not hangs
    assert not _prefetch_threads() and source.closed
    assert source.produced <= 11 + 4
    assert next(ahead, None) is None  # closed: nothing more, not the items read ahead


def test_a_with_block_closes_the_read_ahead():
    source = Counting()
    with Prefetch(source, 2) as ahead:
        assert next(ahead) == 0
    assert not _prefetch_threads() and source.closed


def test_a_dropped_read_ahead_stops_its_thread():
    finished = threading.Event()

    def endless():
        try:
            yield from itertools.count()
        finally:
            finished.set()  # the generator's own cleanup ran, in the producer thread

    ahead = Prefetch(endless(), 2)
    assert next(ahead) == 0 and len(_prefetch_threads()) == 1
    del ahead
    gc.collect()
    assert finished.wait(5.0) and _wait_for(lambda: not _prefetch_threads(), 5.0)


def test_a_read_ahead_never_started_closes_its_source_without_a_thread():
    source = Counting()
    Prefetch(source, 2).close()
    assert source.closed and source.produced == 0 and not _prefetch_threads()
    with pytest.raises(ValueError, match="at least 1"):
        Prefetch(source, 0)


# -- the uncached stream ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from saelab.data.model import load_model

    return load_model({"name": "tiny", "path": str(tiny_model_dir), "hook": "blocks.0.hook_out",
                       "dtype": "float32", "device": "cpu"}, hooks=["blocks.0.hook_out", "blocks.1.hook_out"])


def _datamodule(model, corpus_dir: Path, prefetch_batches: int | None, hooks: list[str]):
    from saelab.data.datamodule import ActivationDataModule
    from saelab.data.sources import build_source

    data_cfg = {"_target_": TEXT_FILES, "source": "text_files", "path": str(corpus_dir), "context_size": 32,
                "prepend_bos": True, "eval_fraction": 0.1, "train_tokens": 8192, "batch_size": 128,
                "buffer_tokens": 1024, "model_batch_size": 4, "normalize": "unit_mean_squared_norm",
                "normalize_tokens": 512, "cache": "off"}
    if prefetch_batches is not None:
        data_cfg["prefetch_batches"] = prefetch_batches
    dm = ActivationDataModule(data_cfg, model, 256, seed=5, hooks=hooks, source=build_source(data_cfg))
    dm.setup()
    return dm


def _take(stream, n: int) -> list[dict[str, torch.Tensor]]:
    batches = [batch for _, batch in zip(range(n), stream, strict=False)]
    assert len(batches) == n
    return batches


def _assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y) and all(torch.equal(x[hook], y[hook]) for hook in x)


HOOKS = [["blocks.0.hook_out"], ["blocks.0.hook_out", "blocks.1.hook_out"]]


@pytest.mark.parametrize("hooks", HOOKS, ids=["one-hook", "two-hooks"])
def test_the_prefetched_stream_is_the_inline_stream(tiny_model, tiny_corpus_dir, hooks):
    """Same batches, same order, bit for bit; 24 batches of 128 need ~40 forwards of 4 windows: far past the
    read-ahead and several buffer refills."""
    inline = _datamodule(tiny_model, tiny_corpus_dir, 0, hooks)
    ahead = _datamodule(tiny_model, tiny_corpus_dir, 3, hooks)
    assert ahead.scales == inline.scales
    stream = ahead.train_batches()
    expected, got = _take(inline.train_batches(), 24), _take(stream, 24)
    assert len(_prefetch_threads()) == 1  # the batches really came through a read-ahead thread
    _assert_same(got, expected)
    assert not torch.equal(got[0][hooks[0]], got[1][hooks[0]])  # a stream of distinct batches, not one repeated
    del stream  # the consumer drops its stream (as Lightning does when fit ends): the thread stops
    gc.collect()
    assert _wait_for(lambda: not _prefetch_threads(), 5.0)


def test_a_resumed_prefetched_stream_continues_where_the_inline_one_stopped(tiny_model, tiny_corpus_dir):
    hooks = HOOKS[0]
    whole = _take(_datamodule(tiny_model, tiny_corpus_dir, 0, hooks).train_batches(), 20)
    resumed = _datamodule(tiny_model, tiny_corpus_dir, 2, hooks)
    resumed.load_state_dict({"batches_consumed": 7, "scales": dict(resumed.scales)})
    _assert_same(_take(resumed.train_batches(), 13), whole[7:])


def test_each_ranks_prefetched_share_is_its_inline_share(tiny_model, tiny_corpus_dir):
    """Under DDP each rank runs the model on its own share of the windows (the other branch of _rank_batches)."""
    hooks = HOOKS[0]
    inline, ahead = (_datamodule(tiny_model, tiny_corpus_dir, depth, hooks) for depth in (0, 2))
    for rank in (0, 1):
        _assert_same(_take(ahead._rank_batches(rank, 2), 6), _take(inline._rank_batches(rank, 2), 6))


def test_a_forward_that_fails_in_the_read_ahead_fails_the_stream(tiny_model, tiny_corpus_dir, monkeypatch):
    from saelab.data import activations

    dm = _datamodule(tiny_model, tiny_corpus_dir, 2, HOOKS[0])
    real, calls = activations.window_activations, itertools.count()

    def fails_on_the_fifth(model, windows, *args, **kwargs):
        if next(calls) == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, windows, *args, **kwargs)

    monkeypatch.setattr(activations, "window_activations", fails_on_the_fifth)
    with pytest.raises(RuntimeError, match="simulated"):
        _take(dm.train_batches(), 100)


def test_teardown_stops_a_read_ahead_still_held(tiny_model, tiny_corpus_dir):
    """Lightning calls teardown when fit ends: no forward may run on beside the end-of-run evaluation, even while
    something still holds the training stream."""
    dm = _datamodule(tiny_model, tiny_corpus_dir, 2, HOOKS[0])
    stream = dm.train_batches()
    next(stream)
    assert len(_prefetch_threads()) == 1
    dm.teardown("fit")
    assert not _prefetch_threads()
    del stream


def test_a_new_stream_stops_the_previous_ones_read_ahead(tiny_model, tiny_corpus_dir):
    """Two threads must never run the one model at once (its fast path keeps per-call state)."""
    dm = _datamodule(tiny_model, tiny_corpus_dir, 2, HOOKS[0])
    first = dm.train_batches()
    next(first)
    second = dm.train_batches()
    next(second)
    assert len(_prefetch_threads()) == 1
    del first, second


def test_a_lightning_fit_on_the_prefetched_stream_leaves_no_thread(tiny_model, tiny_corpus_dir, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        """A linear map trained on the stream: enough for Lightning to draw batches through its loop."""

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(32, 32)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x = batch["blocks.0.hook_out"]
            self.seen.append(x.clone())
            return (self.layer(x) - x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = _datamodule(tiny_model, tiny_corpus_dir, 2, HOOKS[0])
    probe = Probe()
    trainer = L.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(probe, datamodule=dm)
    assert not _prefetch_threads()  # stopped by fit's end itself (teardown), with no garbage collection asked
    inline = _take(_datamodule(tiny_model, tiny_corpus_dir, 0, HOOKS[0]).train_batches(), 10)
    assert all(torch.equal(seen, batch["blocks.0.hook_out"]) for seen, batch in zip(probe.seen, inline, strict=True))


# -- the knob ---------------------------------------------------------------------------------------------------
def test_a_negative_prefetch_batches_is_one_line_naming_the_field(tiny_model, tiny_corpus_dir):
    from saelab.run.compose import compose_run_config
    from saelab.run.schema import check_run_config

    expected = "data.prefetch_batches=-1 is not allowed: expected a non-negative integer"
    with pytest.raises(ConfigError) as err:
        check_run_config(compose_run_config(["data.prefetch_batches=-1"]))
    assert str(err.value) == expected
    with pytest.raises(ConfigError) as err:  # a datamodule built without the schema (tools, tests) checks it too
        _datamodule(tiny_model, tiny_corpus_dir, -1, HOOKS[0])
    assert str(err.value) == expected


def test_without_the_knob_the_stream_is_inline(tiny_model, tiny_corpus_dir):
    dm = _datamodule(tiny_model, tiny_corpus_dir, None, HOOKS[0])
    _take(dm.train_batches(), 2)
    assert dm.prefetch_batches == 0 and not _prefetch_threads()
