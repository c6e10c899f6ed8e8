"""data/protocol.StreamDataModule: both of saelab's datamodules satisfy it once set up, and every `datamodule.<attr>`
that run/ and cli/ read is one of its members, so a new use has to be declared there (with what it holds) first."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from saelab.data.protocol import StreamDataModule
from saelab.data.sources import build_source
from saelab.run.compose import compose_run_config
from tests.conftest import tiny_overrides

SRC = Path(__file__).resolve().parents[1] / "src" / "saelab"
READERS = sorted([*(SRC / "run").glob("*.py"), *(SRC / "cli").glob("*.py")])
# Read of the text datamodule alone, by a tool that refuses a source without a model before it opens its stream.
_CACHE_CLI = "cli/cache.py (saelab-cache: a source without a model has no cache)"
TEXT_ONLY = dict.fromkeys(("caches", "build_cache_share", "finish_cache"), _CACHE_CLI)


def protocol_members() -> set[str]:
    """The Protocol's declared attributes and methods."""
    methods = {name for name, value in vars(StreamDataModule).items() if callable(value) and not name.startswith("_")}
    return set(StreamDataModule.__annotations__) | methods


def datamodule_reads(path: Path) -> set[str]:
    """Every <attr> in `datamodule.<attr>` or `<x>.datamodule.<attr>` (stream.datamodule, trainer.datamodule)."""
    reads = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        holder = node.value
        if (isinstance(holder, ast.Name) and holder.id == "datamodule") or (
                isinstance(holder, ast.Attribute) and holder.attr == "datamodule"):
            reads.add(node.attr)
    return reads


def test_every_datamodule_attribute_run_reads_is_declared():
    reads = {path.relative_to(SRC).as_posix(): datamodule_reads(path) for path in READERS}
    run_reads = set().union(*(r for name, r in reads.items() if name.startswith("run/")))
    assert {"scales", "eval_acts", "setup"} <= run_reads  # the scan sees run/'s reads at all
    undeclared = {name: sorted(r - protocol_members() - set(TEXT_ONLY)) for name, r in reads.items()}
    assert not any(undeclared.values()), (
        f"datamodule attributes read but not declared in saelab.data.protocol.StreamDataModule: "
        f"{ {k: v for k, v in undeclared.items() if v} }")


def _check(datamodule, hooks: list[str]) -> None:
    """The Protocol holds, and its members hold what their docstrings say, for a datamodule set up."""
    assert isinstance(datamodule, StreamDataModule)
    missing = [name for name in protocol_members() if not hasattr(datamodule, name)]
    assert not missing
    assert set(datamodule.scales) == set(datamodule.input_rms) == set(datamodule.eval_acts) == set(hooks)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 2 for v in datamodule.eval_acts.values())
    assert {"batches_consumed", "scales"} <= set(datamodule.state_dict())


def test_the_synthetic_datamodule_satisfies_the_protocol():
    cfg = compose_run_config(["data=synthetic", "eval.tokens=1024"])
    source = build_source(cfg.data)
    hooks = source.hooks(cfg.model)
    datamodule = source.datamodule(cfg.data, None, 1024, 0, cache_dir=None, train_tokens=None, hooks=hooks)
    datamodule.setup()
    _check(datamodule, hooks)
    assert datamodule.eval_firing is not None and datamodule.eval_firing.shape[0] == 1024  # it knows its world
    assert datamodule.eval_windows is None and datamodule.special is None  # no text


def test_the_text_datamodule_satisfies_the_protocol(tiny_model_dir, tiny_corpus_dir, tmp_path):
    from saelab.data.model import load_model

    cfg = compose_run_config([*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path), "data.cache=off"])
    source = build_source(cfg.data)
    hooks = source.hooks(cfg.model)
    model = load_model(cfg.model, hooks=hooks)
    datamodule = source.datamodule(cfg.data, model, int(cfg.eval.tokens), 0, cache_dir=str(tmp_path),
                                   train_tokens=None, hooks=hooks)
    datamodule.setup()
    _check(datamodule, hooks)
    assert datamodule.eval_firing is None  # text has no world of true features
    assert datamodule.eval_windows is not None and datamodule.special is not None


@pytest.mark.parametrize("holder", ["datamodule.scales", "stream.datamodule.novel_field", "x.datamodule.setup()"])
def test_the_scan_finds_reads(tmp_path, holder):
    path = tmp_path / "m.py"
    path.write_text(f"{holder}\nsource.datamodule(1)\n")
    assert datamodule_reads(path) == {holder.split(".")[-1].rstrip("()")}
