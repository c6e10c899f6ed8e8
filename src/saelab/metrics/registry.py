"""Every metrics.json key, once: what it means, which direction is better, how it prints, what it needs, and
where it is shown. Reports, tables, Pareto plots, the dashboard and every evaluation read this module instead
of keeping their own lists of names.

An entry (`Metric`) is one key of metrics.json. `source` says what writes it: a family function that computes
several metrics in one pass (`reconstruction`: metrics/reconstruction.py's ReconstructionMetrics.compute;
`ground_truth`: metrics/ground_truth.py's ground_truth_metrics; `spliced`: metrics/spliced.py's
spliced_*_metrics_many), the run itself (`run`: facts such as `variant` or `steps`, written by run/results.py and
cli/evaluate.py, registered so the views can order and show them), or the entry's own `compute` function
(`function`). `needs` says what an evaluation must have for the metric to apply: `ground_truth` (a source that
knows its features, data=synthetic), `model` (spliced metrics run the model), `target` (a transcoder's target
hook). run/evaluation.py asks `applicable()` which sources to run; nothing else decides it by name.

The order of the entries below is the display order of every view (`show`): `sweep` (report.csv's leading
columns, reports/sweep.py), `table` (the markdown report and its seeds table, reports/tables.py), `pareto`
(an extra Pareto plot of its own, reports/report.py, beside --y), `dashboard` (the run-metrics box,
dashboard/collect.py). `batch_topk_<name>` (eval.batch_topk) is `<name>` measured another way, and `diff_<name>`
a spliced metric measured in the second model of a diffing pair (model.diff_with): `get` derives their entries,
so they need none of their own.

A new metric touches exactly:

1. one function producing the value, either
   - a new key in a family function's result dict (metrics/reconstruction.py, metrics/ground_truth.py or
     metrics/spliced.py), or
   - a function of its own, `fn(sae, stream, hook, target_hook) -> float` (sae: normalised activations in and
     out, as in run/evaluation.py's held_out_metrics; stream: run/stream.py's Stream, its held-out activations
     `stream.datamodule.eval_acts[hook]`), in a module under src/saelab/metrics/, named as the entry's
     `compute`; held_out_metrics then calls it at the end of a run, in the periodic evaluation, in saelab-eval
     and in the SAELens cross-check, wherever its `needs` are met;
2. one `Metric(...)` entry in ENTRIES below, at the place where it should appear in the views it names.

Nothing else: report.csv, the markdown tables, the Pareto plots (frontier direction and axis label from
`better`), the dashboard and metrics.json pick it up from the entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

Better = Literal["lower", "higher", "none"]
Need = Literal["ground_truth", "model", "target", "sites"]
View = Literal["sweep", "table", "pareto", "dashboard"]
Source = Literal["reconstruction", "ground_truth", "spliced", "run", "function", "sites"]

BATCH_TOPK = "batch_topk_"  # run/evaluation.py's batch_topk_metrics: every held-out metric by the batch top-k
SECOND_MODEL = "diff_"  # run/evaluation.py's spliced: a diffing crosscoder's spliced metrics in model.diff_with
SOURCE_NEEDS: dict[str, frozenset[str]] = {  # what a family's metrics need at the least
    "reconstruction": frozenset(), "ground_truth": frozenset({"ground_truth"}), "spliced": frozenset({"model"}),
    "run": frozenset(), "function": frozenset(), "sites": frozenset({"sites"}),
}


@dataclass(frozen=True)
class Metric:
    """One metrics.json key (see the module docstring for each field's readers)."""

    name: str  # the key in metrics.json
    description: str
    better: Better  # lower / higher is better; none: an axis (L0), a reference value or a fact of the run
    source: Source
    fmt: str = "{:.4g}"  # a float's display in the tables
    needs: frozenset[Need] = frozenset()
    show: frozenset[View] = frozenset()
    compute: Callable[..., float] | None = None  # source "function": fn(sae, stream, hook, target_hook)

    def __post_init__(self) -> None:
        """Refuse an entry the readers would misread: an unknown direction, need, view or source."""
        for field, value, allowed in (("better", {self.better}, Better), ("needs", self.needs, Need),
                                      ("show", self.show, View), ("source", {self.source}, Source)):
            unknown = set(value) - set(get_args(allowed))
            if unknown:
                raise ValueError(f"metric {self.name!r}: {field} {sorted(unknown)} not among {get_args(allowed)}")
        if (self.compute is not None) != (self.source == "function"):
            raise ValueError(f"metric {self.name!r}: a compute function exactly when source is 'function'")
        if not SOURCE_NEEDS[self.source] <= self.needs:
            raise ValueError(f"metric {self.name!r}: a {self.source} metric needs {sorted(SOURCE_NEEDS[self.source])}")

    @property
    def higher_is_better(self) -> bool:
        return self.better == "higher"

    def format(self, value: Any) -> str:
        """`fmt` for a finite float, str() for anything else (ints, strings), "" for a missing value."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return self.fmt.format(value) if isinstance(value, float) else str(value)


def _m(name: str, description: str, better: Better, source: Source, *show: View,
       needs: Iterable[Need] = ()) -> Metric:
    """An entry whose needs are its source's plus `needs`."""
    return Metric(name, description, better, source, needs=SOURCE_NEEDS[source] | frozenset(needs),
                  show=frozenset(show))


_R, _G, _S = "reconstruction", "ground_truth", "spliced"

ENTRIES: tuple[Metric, ...] = (
    _m("variant", "the SAE class trained (eval:<architecture> for saelab-eval)", "none", "run", "sweep"),
    _m("architecture", "the SAELens architecture of the export", "none", "run", "sweep"),
    _m("target_hook", "a transcoder's target hook (its output's)", "none", "run", "sweep", needs=["target"]),
    _m("l0", "mean active latents per held-out token: the sparsity axis", "none", _R,
       "sweep", "table", "dashboard"),
    _m("fvu", "fraction of variance unexplained: SSE / total variance about the mean", "lower", _R,
       "sweep", "table", "dashboard"),
    _m("explained_variance", "1 - fvu", "higher", _R, "sweep", "dashboard"),
    _m("delta_lm_loss", "next-token CE spliced minus clean (causal LMs)", "lower", _S,
       "sweep", "table", "pareto", "dashboard"),
    _m("loss_recovered", "(CE zero-ablated - CE spliced) / (CE zero-ablated - CE clean) (causal LMs)", "higher", _S,
       "sweep", "table", "dashboard"),
    _m("kl_sae", "KL(clean || spliced) of the next-token distributions per token (causal LMs)", "lower", _S,
       "sweep", "dashboard"),
    _m("spliced_hidden_cosine", "cosine of mean-pooled last hidden states, spliced vs clean (encoders)", "higher",
       _S, "sweep", "table", "pareto", "dashboard"),
    _m("mcc", "mean |cos| of the optimal one-to-one matching of decoder rows to true features", "higher", _G,
       "table"),
    _m("recovered_fraction", "true features whose matched latent has |cos| > 0.9", "higher", _G, "table"),
    _m("firing_f1", "F1 of matched latents' firing against their features' (|cos| > 0.5)", "higher", _G, "table"),
    _m("synthsaebench_f1", "SynthSAEBench's F1: every latent against its nearest feature", "higher", _G, "table"),
    _m("absorption_rate", "P(a parent's latent is silent | the parent and a child fire)", "lower", _G, "table"),
    _m("exclusive_precision", "B-only latents (relative decoder norm > 0.9) whose feature is truly B's alone",
       "higher", "sites", "table", needs=["ground_truth"]),
    _m("exclusive_recall", "B-exclusive features that a B-only latent reads as", "higher", "sites", "table",
       needs=["ground_truth"]),
    _m("latent_scaling_auroc", "how well Latent Scaling's nu separates false B-only latents from true ones",
       "higher", "sites", "table", needs=["ground_truth"]),
    _m("layer_writes_recovered", "a layered world's (feature, layer) writes some latent's decoder block matches "
       "(|cos| > 0.9)", "higher", "sites", "table", needs=["ground_truth"]),
    _m("cross_features_recovered", "cross-layer features with every write recovered", "higher", "sites", "table",
       needs=["ground_truth"]),
    _m("latents_per_cross_feature", "distinct latents that recover one cross-layer feature's writes (a CLT: 1)",
       "lower", "sites", "table", needs=["ground_truth"]),
    _m("cross_feature_span", "layers a recovered cross-layer feature writes (per-layer transcoders need that many "
       "latents)", "none", "sites", needs=["ground_truth"]),
    _m("shrinkage", "||x_hat||^2 / <x, x_hat>: 1 is unbiased, below 1 shrunk", "none", _R,
       "sweep", "table", "dashboard"),
    _m("cosine", "mean per-token cosine of reconstruction and input", "higher", _R, "sweep", "dashboard"),
    _m("norm_ratio", "mean per-token ||x_hat|| / ||x||: 1 is unbiased", "none", _R, "sweep"),
    _m("dead_fraction", "latents that never fired on the held-out tokens", "lower", _R,
       "sweep", "table", "dashboard"),
    _m("dense_fraction", "latents firing on more than 10% of held-out tokens", "lower", _R, "sweep", "dashboard"),
    _m("d_sae", "number of latents", "none", "run", "sweep"),
    _m("steps", "optimizer steps trained", "none", "run", "sweep", "table", "dashboard"),
    _m("tokens_trained", "steps x batch size x world size", "none", "run", "sweep", "dashboard"),
    _m("wall_time_s", "seconds from start to metrics.json", "none", "run", "sweep", "table", "dashboard"),
    # Written, shown only in the full tables (report.csv's later columns, the dashboard's "all of metrics.json").
    _m("mse", "mean per-token squared error ||x - x_hat||^2", "lower", _R),
    _m("tokens", "held-out tokens evaluated", "none", _R),
    _m("uniqueness", "distinct nearest true features among firing latents / firing latents", "higher", _G),
    _m("firing_precision", "P(feature fires | its matched latent fires), averaged", "higher", _G),
    _m("firing_recall", "P(latent fires | its matched feature fires), averaged", "higher", _G),
    _m("synthsaebench_precision", "SynthSAEBench's precision over all latents", "higher", _G),
    _m("synthsaebench_recall", "SynthSAEBench's recall over all latents", "higher", _G),
    _m("synthsaebench_uniqueness", "distinct nearest true features among all latents / latents", "higher", _G),
    _m("spliced_kind", "causal_lm (next-token losses) or encoder_hidden_cosine", "none", _S),
    _m("ce_clean", "next-token CE of the model as it is: the reference", "none", _S),
    _m("ce_sae", "next-token CE with the SAE spliced in", "lower", _S),
    _m("ce_zero", "next-token CE with the hook zero-ablated: the floor", "none", _S),
    _m("spliced_tokens", "predicted positions the spliced losses average over", "none", _S),
    _m("spliced_hidden_cosine_zero", "spliced_hidden_cosine with the hook zero-ablated: the floor", "none", _S),
    _m("spliced_windows", "windows the hidden cosine averages over", "none", _S),
    _m("site_fvu", "a crosscoder's FVU at each site ({site: fvu})", "none", "sites"),
    _m("site_l0", "active latents per token that write to each site ({site: l0})", "none", "sites"),
    _m("site_dead_fraction", "latents writing to a site that never fired ({site: fraction})", "none", "sites"),
    _m("relative_norm_histogram", "firing latents in 20 bins of Minder et al.'s relative decoder norm", "none",
       "sites"),
    _m("exclusive_b_latents", "firing latents whose relative decoder norm is above 0.9 (B only)", "none", "sites"),
    _m("latent_scaling_median", "median Latent Scaling ratio nu = beta_A / beta_B of the B-only latents", "none",
       "sites"),
    _m("site_mcc", "recovery of each site's present features by that site's decoder ({site: mcc})", "none",
       "sites", needs=["ground_truth"]),
    _m("sites", "the sites a crosscoder reads and writes", "none", "run", needs=["sites"]),
    _m("site_normalization_scales", "a crosscoder's normalisation constant at each site", "none", "run",
       needs=["sites"]),
    _m("d_in", "input width", "none", "run"),
    _m("d_out", "a transcoder's output width", "none", "run", needs=["target"]),
    _m("hook_name", "the hook saelab-eval read", "none", "run"),
    _m("normalization_scale", "the input's normalisation constant", "none", "run"),
    _m("target_normalization_scale", "a transcoder's target normalisation constant", "none", "run",
       needs=["target"]),
    _m("world_size", "processes trained on", "none", "run"),
    _m("target_l0", "the L0 the controller was asked for (sae.target_l0)", "none", "run"),
    _m("sparsity_coefficient_reached", "the sparsity coefficient the L0 controller ended with", "none", "run"),
    _m("evaluated", "the export saelab-eval measured", "none", "run"),
    _m("trained_by", "who trained the export saelab-eval measured", "none", "run"),
    _m("overrides", "the job's Hydra overrides", "none", "run"),
)

_registry: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add an entry (after the others in every view); a name may be registered once."""
    if metric.name in _registry:
        raise ValueError(f"metric {metric.name!r} is already registered")
    _registry[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    del _registry[name]


@contextmanager
def registered(*metrics: Metric) -> Iterator[None]:
    """Entries registered for the duration of a block (tests; an analysis adding its own metric)."""
    for metric in metrics:
        register(metric)
    try:
        yield
    finally:
        for metric in metrics:
            _registry.pop(metric.name, None)


for _entry in ENTRIES:
    register(_entry)


def find(name: str) -> Metric | None:
    """The entry of a metrics.json key (`batch_topk_<name>` and `diff_<name>` derived from `<name>`'s), or None."""
    if name in _registry:
        return _registry[name]
    if name.startswith(BATCH_TOPK) and name[len(BATCH_TOPK):] in _registry:
        base = _registry[name[len(BATCH_TOPK):]]
        return replace(base, name=name, description=f"{base.description}, by the batch top-k", show=frozenset())
    base = _registry.get(name[len(SECOND_MODEL):]) if name.startswith(SECOND_MODEL) else None
    if base is not None and base.source == "spliced":
        return replace(base, name=name, description=f"{base.description}, in the second model (model.diff_with)",
                       show=frozenset())
    return None


def get(name: str) -> Metric:
    """find(), raising KeyError for a key no entry describes."""
    metric = find(name)
    if metric is None:
        raise KeyError(f"no metric {name!r} in saelab.metrics.registry")
    return metric


def all_metrics() -> list[Metric]:
    """Every entry, in display order."""
    return list(_registry.values())


def shown(view: View) -> list[str]:
    """The names a view shows, in display order."""
    if view not in get_args(View):
        raise ValueError(f"view {view!r} not among {get_args(View)}")
    return [m.name for m in _registry.values() if view in m.show]


def better(name: str) -> Better | None:
    """Which direction of `name` is better; None for a column no entry describes (an override, say)."""
    metric = find(name)
    return metric.better if metric is not None else None


def applicable(*, ground_truth: bool = False, model: bool = False, target: bool = False, sites: bool = False
               ) -> list[Metric]:
    """The metrics an evaluation can produce with what it has (a source's ground truth, a model, a target,
    several sites: a crosscoder)."""
    have = {need for need, present in (("ground_truth", ground_truth), ("model", model), ("target", target),
                                       ("sites", sites)) if present}
    return [m for m in _registry.values() if m.needs <= have]


def applicable_sources(*, ground_truth: bool = False, model: bool = False, target: bool = False,
                       sites: bool = False) -> set[str]:
    """The sources (family functions) that have at least one applicable metric."""
    return {m.source for m in applicable(ground_truth=ground_truth, model=model, target=target, sites=sites)}
