"""trainer=ddp: two CPU processes (gloo) train one SAE on disjoint data and end with identical weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from saelab.saes.saelens_format import load_exported
from tests.conftest import run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def _run(model_dir, corpus_dir, tmp_path, name: str, cache: str, devices: int, tokens: int):
    out, probe = tmp_path / name, tmp_path / f"{name}_probe"
    result = run_cli([
        *tiny_overrides(model_dir, corpus_dir, out), f"paths.cache_dir={tmp_path / 'cache'}",
        f"data.cache={cache}", "trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        f"data.train_tokens={tokens}", "eval.spliced_windows=0",
        "+callbacks.probe._target_=tests.ddp_probe.RankRecorder", f"+callbacks.probe.out_dir={probe}",
    ], timeout=600, fresh=True)  # Lightning launches the other rank as this process's command line again
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(devices)]
    return out, probe, records


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_two_cpu_ranks_see_disjoint_batches_and_end_identical(cache, tiny_model_dir, tiny_corpus_dir, tmp_path):
    out, probe, records = _run(tiny_model_dir, tiny_corpus_dir, tmp_path, "ddp", cache, devices=2, tokens=10240)
    assert all(r["world_size"] == 2 for r in records)
    assert len(records[0]["batches"]) == len(records[1]["batches"]) == 40  # 10240 tokens / 256 per rank
    assert not set(records[0]["batches"]) & set(records[1]["batches"])  # no batch in common
    # Rows: short prefixes (a window's first tokens) repeat across the corpus, so some activations recur
    # naturally (about 11% here); ranks reading the same data would share nearly all of them.
    rows = [set(r["rows"]) for r in records]
    assert len(rows[0] & rows[1]) < 0.3 * len(rows[0]), len(rows[0] & rows[1])
    if cache == "auto":  # the ranks' batches together are exactly the single-process stream's first 80
        _, _, (single,) = _run(tiny_model_dir, tiny_corpus_dir, tmp_path, "single", cache, devices=1, tokens=20480)
        assert sorted(records[0]["batches"] + records[1]["batches"]) == sorted(single["batches"])

    weights = [load_file(probe / f"rank{r}.safetensors") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name

    (run_dir,) = {p.parent for p in out.rglob("metrics.json")}  # rank 0 alone reports
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["tokens_trained"] == 2 * 10240
    assert metrics["fvu"] < 0.5, metrics  # the pair of ranks trained one SAE that learned
    exported = load_exported(run_dir / "sae")
    assert torch.equal(exported.W_dec, weights[0]["W_dec"])  # the export is the ranks' SAE (scale is in b_dec)
