"""Spliced downstream metrics (SPEC section 5): run the model with the hook's activation replaced by the SAE
reconstruction and measure what the rest of the network makes of it.

Causal LMs get next-token losses (CE clean / spliced / zero-ablated, delta LM loss, fraction of loss
recovered, KL(clean || spliced)). Encoders without a trained LM head (e.g. MiniLM, whose checkpoint is a
bare BertModel: the bridge's MLM head would be randomly initialised) get the cosine between mean-pooled
final hidden states with and without the splice instead, and the result says which kind it is.

Special-token positions (BOS/CLS, EOS/SEP, PAD) keep their original activation: the SAE never trains on
them (the activation stream excludes them), so splicing them would measure an input the SAE never saw.
Zero-ablation ablates the same positions the splice replaces. Splice hooks are temporary: the bridge
removes them when each forward pass ends, even if it raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.data.activations import window_activations
from saelab.data.model import LoadedModel
from saelab.data.tokens import SpecialTokens, keep_mask

Reconstruct = Callable[[Tensor], Tensor]
Key = TypeVar("Key", bound=Hashable)


def is_causal_lm(model: LoadedModel) -> bool:
    """A decoder-only model whose logits predict the next token (GPT-2, Pythia, Gemma...).

    Bidirectional encoders (BERT, MiniLM) and encoder-decoders have no next-token objective to splice into.
    """
    cfg = model.bridge.cfg
    hf_config = getattr(getattr(model.bridge, "original_model", None), "config", None)
    if getattr(hf_config, "is_encoder_decoder", False):
        return False
    return getattr(cfg, "attention_dir", "causal") == "causal"


@dataclass
class Transcode:
    """A transcoder's splice: the activation at the spliced (target) hook is replaced by predict(activation at
    `reads`), the input hook, which the same forward pass reached earlier and leaves unchanged."""

    predict: Reconstruct
    reads: str


@dataclass
class Crosscode:
    """A crosscoder's splice: every site it writes is replaced at once by its output at that site, predicted from
    the clean activations of all the sites it reads (side by side), which a clean pass captures first (an acausal
    crosscoder reads later layers than some it writes)."""

    predict: Reconstruct
    reads: tuple[str, ...]
    writes: tuple[str, ...]


@dataclass
class CrossLayerTranscode(Crosscode):
    """A cross-layer transcoder's splice (the replacement model of Ameisen et al. 2025): every MLP output it writes
    is replaced by its prediction at once. `causal` (an elementwise encoder): layer l's output is predicted from
    the MLP inputs the spliced pass itself reached at layers up to l (the later ones are zeros, which a causal CLT
    never reads for layer l), so each replacement feeds the next layer's input. Otherwise (TopK, whose selection
    spans all layers) from a clean pass's inputs, as a crosscoder's."""

    causal: bool = True


Splice = Reconstruct | Transcode | Crosscode  # what replaces the activations: an SAE's, a transcoder's, a crosscoder's
Hooks = str | tuple[str, ...]  # the hook(s) a splice replaces (a crosscoder's: every site it writes)


def _replace(mask: Tensor, value: Callable[[Tensor], Tensor]) -> Callable[[Tensor, object], Tensor]:
    """A forward hook that puts value(activation) at the `mask` positions and leaves the others."""
    def splice(acts: Tensor, hook: object) -> Tensor:
        replaced = value(acts).to(device=acts.device, dtype=acts.dtype)
        return torch.where(mask.to(acts.device)[..., None], replaced, acts)
    return splice


def _crosscode_hooks(model: LoadedModel, tokens: Tensor, crosscode: Crosscode, mask: Tensor) -> list:
    """Replace the sites the crosscoder writes in `model`; its reads may include the other model of a diffing pair
    (LoadedModel.side), whose sites another pass replaces (run/evaluation.py's spliced)."""
    reads = window_activations(model, tokens, list(crosscode.reads), fast=False)  # no block past the deepest hook
    out = crosscode.predict(torch.cat([reads[h].float() for h in crosscode.reads], dim=-1))
    parts = out.chunk(len(crosscode.writes), dim=-1)
    located = [model.side(site) for site in crosscode.writes]
    return [(hook, _replace(mask, lambda acts, part=part: part))
            for (side, hook), part in zip(located, parts, strict=True) if side is model]


def _cross_layer_hooks(model: LoadedModel, clt: CrossLayerTranscode, mask: Tensor) -> list:
    """Read each MLP input as the spliced pass reaches it; replace each MLP output by the CLT's output there,
    predicted from the inputs read so far (later layers' zero)."""
    seen: dict[int, Tensor] = {}

    def read(layer: int) -> Callable[[Tensor, object], None]:
        def hook(acts: Tensor, hook: object) -> None:
            seen[layer] = acts.float()
        return hook

    def write(layer: int) -> Callable[[Tensor], Tensor]:
        def value(acts: Tensor) -> Tensor:
            x = torch.cat([seen.get(k, torch.zeros_like(acts, dtype=torch.float32)) for k in range(len(clt.reads))],
                          dim=-1)
            return clt.predict(x).chunk(len(clt.writes), dim=-1)[layer]
        return value

    hooks = [(model.side(h)[1], read(k)) for k, h in enumerate(clt.reads)]
    return hooks + [(model.side(h)[1], _replace(mask, write(k))) for k, h in enumerate(clt.writes)]


def _splice_hooks(model: LoadedModel, tokens: Tensor, hook: Hooks, reconstruct: Splice | None,
                  mask: Tensor | None) -> list:
    """Forward hooks replacing the activation at `hook` at `mask` positions by reconstruct(activation), by a
    transcoder's prediction from its input hook, by a crosscoder's output at each site it writes, or (reconstruct
    None) by zero (every hook of a tuple). No mask: none (a clean pass)."""
    if mask is None:
        return []
    if isinstance(reconstruct, CrossLayerTranscode) and reconstruct.causal:
        return _cross_layer_hooks(model, reconstruct, mask)
    if isinstance(reconstruct, Crosscode):
        return _crosscode_hooks(model, tokens, reconstruct, mask)
    if reconstruct is None:
        return [(h, _replace(mask, torch.zeros_like)) for h in (hook if isinstance(hook, tuple) else (hook,))]
    if not isinstance(reconstruct, Transcode):
        return [(hook, _replace(mask, lambda acts: reconstruct(acts.float())))]
    source: dict[str, Tensor] = {}

    def read_input(acts: Tensor, hook: object) -> None:
        source["input"] = acts  # returning None leaves the activation as it is

    predicted = _replace(mask, lambda acts: reconstruct.predict(source["input"].float()))
    return [(model.side(reconstruct.reads)[1], read_input), (hook, predicted)]


def _logits(model: LoadedModel, tokens: Tensor, hook: Hooks, reconstruct: Splice | None,
            mask: Tensor | None) -> Tensor:
    """Float32 logits [batch, ctx, vocab]; with a mask, the hook is spliced (reconstruct None = zeros)."""
    fwd_hooks = _splice_hooks(model, tokens, hook, reconstruct, mask)
    return model.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type="logits").float()


def _log_probs(model: LoadedModel, tokens: Tensor, hook: Hooks, reconstruct: Splice | None,
               mask: Tensor | None, predicted: Tensor) -> Tensor:
    """Next-token log-probabilities at the predicted positions (spliced when a mask is given)."""
    return _logits(model, tokens, hook, reconstruct, mask)[:, :-1][predicted].log_softmax(-1)


@torch.no_grad()
def spliced_lm_metrics_many(model: LoadedModel, reconstructs: Mapping[Key, Splice], windows: Tensor,
                            special: SpecialTokens, batch_windows: int, hook: Hooks | None = None
                            ) -> dict[Key, dict[str, float | str]]:
    """Next-token CE clean / spliced / zero-ablated, delta LM loss, loss recovered and KL(clean || spliced),
    for every SAE in `reconstructs` (the clean and zero-ablated passes run once for all of them).

    A prediction (logits at t for token t+1) counts only if both token t and token t+1 are real text, so
    the BOS position and every special input or target are masked. Sums run over all windows before
    dividing (a token mean, not a mean of batch means).
    """
    hook = hook or model.hooks[0]
    shared = {"ce_clean": 0.0, "ce_zero": 0.0}
    sums = {key: {"ce_sae": 0.0, "kl_sae": 0.0} for key in reconstructs}
    n_predicted = 0
    for start in range(0, len(windows), batch_windows):
        tokens = windows[start : start + batch_windows].to(model.device)
        keep = keep_mask(tokens, special)
        predicted = keep[:, :-1] & keep[:, 1:]
        targets = tokens[:, 1:][predicted]
        clean = _log_probs(model, tokens, hook, None, None, predicted)
        shared["ce_clean"] += float(F.nll_loss(clean, targets, reduction="sum"))
        for key, reconstruct in reconstructs.items():
            spliced = _log_probs(model, tokens, hook, reconstruct, keep, predicted)
            sums[key]["ce_sae"] += float(F.nll_loss(spliced, targets, reduction="sum"))
            # KL(clean || spliced) = sum p_clean (log p_clean - log p_sae)
            sums[key]["kl_sae"] += float(F.kl_div(spliced, clean, log_target=True, reduction="sum"))
        zero = _log_probs(model, tokens, hook, None, keep, predicted)
        shared["ce_zero"] += float(F.nll_loss(zero, targets, reduction="sum"))
        n_predicted += int(predicted.sum())
    if n_predicted == 0:
        raise ValueError("no predicted positions: every window is special tokens only")
    results = {}
    for key, own in sums.items():
        m = {k: v / n_predicted for k, v in (shared | own).items()}
        recoverable = m["ce_zero"] - m["ce_clean"]
        results[key] = {
            "spliced_kind": "causal_lm",
            **m,
            "delta_lm_loss": m["ce_sae"] - m["ce_clean"],
            "loss_recovered": (m["ce_zero"] - m["ce_sae"]) / recoverable if recoverable != 0 else float("nan"),
            "spliced_tokens": float(n_predicted),
        }
    return results


def spliced_lm_metrics(model: LoadedModel, reconstruct: Reconstruct, windows: Tensor, special: SpecialTokens,
                       batch_windows: int, hook: str | None = None) -> dict[str, float | str]:
    """spliced_lm_metrics_many for one SAE."""
    return spliced_lm_metrics_many(model, {0: reconstruct}, windows, special, batch_windows, hook)[0]


class _Stop(Exception):
    """Raised by the capture hook to skip everything after the last block (e.g. an untrained MLM head)."""


def _final_hidden(model: LoadedModel, tokens: Tensor, hook: Hooks, reconstruct: Splice | None,
                  mask: Tensor | None) -> Tensor:
    """Output of the last block [batch, ctx, d] (float32), with the hook spliced when a mask is given."""
    final_hook = f"blocks.{int(model.bridge.cfg.n_layers) - 1}.hook_out"
    captured: list[Tensor] = []

    def capture(acts: Tensor, hook: object) -> Tensor:
        captured.append(acts)
        raise _Stop

    fwd_hooks = _splice_hooks(model, tokens, hook, reconstruct, mask)
    with contextlib.suppress(_Stop):
        model.bridge.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (final_hook, capture)], return_type=None)
    if not captured:
        raise RuntimeError(f"the forward pass never reached {final_hook}")
    return captured[0].float()


def _mean_pool(hidden: Tensor, keep: Tensor) -> Tensor:
    weights = keep.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _pooled_cosine(model: LoadedModel, tokens: Tensor, hook: Hooks, reconstruct: Splice | None, keep: Tensor,
                   clean: Tensor) -> float:
    """Summed cosine between the clean pooled hidden states and those with the hook spliced."""
    spliced = _mean_pool(_final_hidden(model, tokens, hook, reconstruct, keep), keep)
    return float(F.cosine_similarity(clean, spliced, dim=-1).sum())


@torch.no_grad()
def spliced_encoder_metrics_many(model: LoadedModel, reconstructs: Mapping[Key, Splice], windows: Tensor,
                                 special: SpecialTokens, batch_windows: int, hook: Hooks | None = None
                                 ) -> dict[Key, dict[str, float | str]]:
    """Mean over windows of cos(pool(h_clean), pool(h_spliced)), h the last block's output, pooled over
    real-text positions (the sentence-transformers embedding, before its final normalisation), for every SAE
    in `reconstructs` (the clean and zero-ablated passes run once for all of them).

    `spliced_hidden_cosine_zero` is the same with the hook zero-ablated: the floor to compare against.
    """
    hook = hook or model.hooks[0]
    zero, totals = 0.0, dict.fromkeys(reconstructs, 0.0)
    n_windows = 0
    for start in range(0, len(windows), batch_windows):
        tokens = windows[start : start + batch_windows].to(model.device)
        keep = keep_mask(tokens, special)
        clean = _mean_pool(_final_hidden(model, tokens, hook, None, None), keep)
        for key, reconstruct in reconstructs.items():
            totals[key] += _pooled_cosine(model, tokens, hook, reconstruct, keep, clean)
        zero += _pooled_cosine(model, tokens, hook, None, keep, clean)
        n_windows += len(tokens)
    if n_windows == 0:
        raise ValueError("no windows to evaluate")
    return {key: {"spliced_kind": "encoder_hidden_cosine", "spliced_hidden_cosine": total / n_windows,
                  "spliced_hidden_cosine_zero": zero / n_windows, "spliced_windows": float(n_windows)}
            for key, total in totals.items()}


def spliced_metrics_many(model: LoadedModel, reconstructs: Mapping[Key, Splice], windows: Tensor,
                         special: SpecialTokens, batch_windows: int, hook: Hooks | None = None
                         ) -> dict[Key, dict[str, float | str]]:
    """The spliced metrics that fit the model, for several SAEs on one hook: next-token losses for causal LMs,
    hidden cosine otherwise. The SAE-independent passes (clean, zero-ablated) run once per batch.

    Each reconstruct maps raw activations [..., d] (float32, on the model's device) to raw reconstructions;
    the caller composes the normalisation (x -> C * sae(x / C)). A transcoder's is a Transcode, which reads its
    input hook and replaces `hook`, its target. `hook` defaults to the trained hook.
    """
    metric = spliced_lm_metrics_many if is_causal_lm(model) else spliced_encoder_metrics_many
    return metric(model, reconstructs, windows, special, batch_windows, hook)


def spliced_metrics(model: LoadedModel, reconstruct: Reconstruct, windows: Tensor, special: SpecialTokens,
                    batch_windows: int, hook: str | None = None) -> dict[str, float | str]:
    """spliced_metrics_many for one SAE."""
    return spliced_metrics_many(model, {0: reconstruct}, windows, special, batch_windows, hook)[0]
