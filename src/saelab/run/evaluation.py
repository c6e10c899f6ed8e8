"""Held-out evaluation, one way for every tool: the end of a run, the periodic evaluation during it, and
saelab-eval on a loaded export all measure an SAE here, on a stream's held-out activations.

Reconstruction metrics at the SAE's hook (a transcoder's against its target hook's activations), ground-truth
metrics where the source knows the world that made the activations, and spliced metrics (the model run with the
SAE's output in place of the activation it reconstructs) where there is a model. Which of these run is the metric
registry's answer (saelab.metrics.registry.applicable), as are the metrics that bring a function of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saelab.data.synthetic_layers import LayeredWorld
from saelab.data.synthetic_sites import MultiSiteWorld
from saelab.metrics import registry
from saelab.metrics.evaluate import evaluate_sae
from saelab.metrics.ground_truth import ground_truth_metrics
from saelab.metrics.layers import layer_recovery
from saelab.metrics.sites import SiteMetrics
from saelab.metrics.spliced import Crosscode, CrossLayerTranscode, Hooks, Splice, Transcode, spliced_metrics_many
from saelab.run.stream import Stream
from saelab.sites import Sites, column_scales


def held_out_metrics(sae: nn.Module, stream: Stream, sites: Sites, batch_size: int) -> tuple[dict[str, Any], Tensor]:
    """(metrics, per-latent log10 firing density) of `sae` (normalised activations in, normalised output out) on
    the stream's held-out activations at the sites it reads; a transcoder is measured against its target's. A
    crosscoder also gets the per-site metrics (metrics/sites.py)."""
    datamodule, truth = stream.datamodule, stream.truth
    hook, target_hook = sites.hook, sites.target_hook
    wanted = registry.applicable(ground_truth=truth is not None, model=stream.model is not None,
                                 target=target_hook is not None, sites=sites.several)
    with_truth = any(m.source == "ground_truth" for m in wanted)
    firing: list[Tensor] | None = [] if with_truth else None
    by_site = (SiteMetrics(sae.W_dec, list(sites.writes), [float(datamodule.scales[h]) for h in sites.writes],
                           diffing=sites.crosscoder) if sites.several else None)
    metrics, density = evaluate_sae(sae, sites.input(datamodule.eval_acts), int(batch_size), firing,
                                    sites.target(datamodule.eval_acts), observe=by_site)
    if with_truth:  # how well the SAE recovers the world's features, from the same held-out encode
        # a crosscoder's decoder in raw units (each site its own scale), as the truth is
        decoder = sae.W_dec if by_site is None else by_site.W.flatten(1)
        metrics |= ground_truth_metrics(decoder, torch.cat(firing), truth.dictionary, datamodule.eval_firing,
                                        truth.parent)
    if by_site is not None:
        metrics |= by_site.compute(truth if isinstance(truth, MultiSiteWorld) else None)
    if isinstance(truth, LayeredWorld) and by_site is not None:  # latents per feature across layers
        metrics |= layer_recovery(by_site.W.flatten(1), truth.writes, truth.output_dictionary)
    for metric in wanted:  # metrics with a function of their own (registry: source "function")
        if metric.compute is not None:
            metrics[metric.name] = float(metric.compute(sae, stream, hook, target_hook))
    return metrics, density


class BatchTopKView(nn.Module):
    """A BatchTopK-style SAE scored by its training selection (encode_batch_topk over each evaluation batch)
    instead of its learned threshold; every other method is the SAE's."""

    def __init__(self, sae: nn.Module):
        super().__init__()
        self.sae = sae
        self.d_sae, self.W_dec = sae.d_sae, sae.W_dec

    def encode(self, x: Tensor) -> Tensor:
        return self.sae.encode_batch_topk(x)

    def output(self, x: Tensor, f: Tensor) -> Tensor:
        return self.sae.output(x, f)


def batch_topk_metrics(sae: nn.Module, stream: Stream, sites: Sites, batch_size: int) -> dict[str, Any]:
    """held_out_metrics by the batch top-k (eval.batch_topk), as batch_topk_<metric>; empty for an SAE without
    one."""
    if not hasattr(sae, "encode_batch_topk"):
        return {}
    metrics, _ = held_out_metrics(BatchTopKView(sae), stream, sites, batch_size)
    return {f"batch_topk_{name}": value for name, value in metrics.items()}


def normalised_splice(sae: nn.Module, sites: Sites, scales: Mapping[str, float]) -> Splice:
    """Raw activations in, raw output out: x -> C sae(x / C) for an SAE trained on normalised activations; a
    transcoder reads its input hook and predicts its target, x -> C_target sae(x / C_input); a crosscoder's sites
    each have their scale C_s."""
    device = next(sae.parameters()).device
    in_scale = column_scales([scales[h] for h in sites.reads], sae.d_in // len(sites.reads)).to(device)
    out_scale = column_scales([scales[h] for h in sites.writes], sae.d_out // len(sites.writes)).to(device)
    sae.eval()

    def predict(x: Tensor) -> Tensor:
        with torch.no_grad():
            return sae(x.to(device).float() / in_scale) * out_scale

    return raw_splice(predict, sites, causal=bool(getattr(sae, "elementwise_encoder", True)))


def raw_splice(predict: Callable[[Tensor], Tensor], sites: Sites, causal: bool = True) -> Splice:
    """A splice from a raw-activation function: an SAE's replaces its hook; a transcoder's reads its input hook
    and replaces its target; a crosscoder's replaces every site it writes; a cross-layer transcoder's replaces every
    MLP output, each from the inputs the spliced pass reached (`causal`: its encoder is elementwise, so layer l's
    output needs the inputs up to l alone; otherwise from a clean pass's)."""
    if sites.cross_layer:
        return CrossLayerTranscode(predict, sites.reads, sites.writes, causal)
    if sites.crosscoder:
        return Crosscode(predict, sites.reads, sites.writes)
    return predict if sites.target_hook is None else Transcode(predict, reads=sites.hook)


def spliced_hooks(sites: Sites) -> Hooks:
    """What a splice replaces: the SAE's hook, a transcoder's target, or every site a crosscoder or a cross-layer
    transcoder writes."""
    return sites.writes if sites.several else sites.writes[0]


def spliced(stream: Stream, splices: Mapping[Hashable, tuple[Hooks, Splice]], n_windows: int, model_batch_size: int
            ) -> dict[Hashable, dict[str, Any]]:
    """Spliced metrics for several SAEs, each (the hook its output replaces, its splice); the clean and
    zero-ablated passes are shared by the SAEs of one hook. Empty without a model or windows.

    A diffing crosscoder (sites in both models of model.diff_with's pair) is spliced into each model in turn, its
    sites there replaced at once: the first model's metrics under their names, the second's as diff_<name>."""
    if not n_windows or not splices or "spliced" not in registry.applicable_sources(model=stream.model is not None):
        return {}
    runs: dict[tuple[Any, Hooks], dict[tuple[Hashable, str], Splice]] = {}  # (model, its hooks) -> splices
    for key, (hooks, splice) in splices.items():
        for model, local, prefix in _model_sides(stream.model, hooks):
            runs.setdefault((model, local), {})[(key, prefix)] = splice
    results: dict[Hashable, dict[str, Any]] = {}
    datamodule = stream.datamodule
    for (model, hooks), on_hooks in runs.items():
        measured = spliced_metrics_many(model, on_hooks, datamodule.eval_windows[:n_windows], datamodule.special,
                                        int(model_batch_size), hooks)
        for (key, prefix), metrics in measured.items():
            results.setdefault(key, {}).update({prefix + name: value for name, value in metrics.items()})
    return results


def _model_sides(model: Any, hooks: Hooks) -> list[tuple[Any, Hooks, str]]:
    """[(model of the pair, the hooks replaced in it as it names them, its metrics' prefix)]: one model unless a
    crosscoder writes sites of both models of a diffing pair (model.diff_with)."""
    sites = hooks if isinstance(hooks, tuple) else (hooks,)
    by_model: dict[Any, list[str]] = {}
    for side, hook in map(model.side, sites):
        by_model.setdefault(side, []).append(hook)
    prefix = registry.SECOND_MODEL if len(by_model) > 1 else ""
    return [(side, tuple(local) if isinstance(hooks, tuple) else local[0], prefix if side.prefix else "")
            for side, local in by_model.items()]
