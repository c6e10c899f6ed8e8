"""What the dashboard shows, computed on held-out text through the exported SAE (raw activations, CPU).

The held-out windows are the run's own (ActivationDataModule.windows()["eval"]: documents never trained on),
taken in corpus order until they hold `tokens` real-text tokens. Their activations at the SAE's hook are
encoded twice in batches: once for every latent's firing count and maximum (which latents are `top`), once
more for the chosen latents' columns only, so memory stays at tokens x chosen, never tokens x d_sae.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.dashboard.options import LatentSpec, Options
from saelab.dashboard.plan import Plan, sae_field
from saelab.errors import ConfigError
from saelab.metrics import registry

log = logging.getLogger("saelab.dashboard")

MAX_ENCODE_FLOATS = 2**26  # one encode batch holds at most this many latent activations (256 MB)
MAX_COLUMN_FLOATS = 2**27  # chosen-latent columns kept at once (512 MB)


@dataclass
class HeldOut:
    """Held-out windows and their real-text activations; row r of `acts` is position `where[r]` (window, pos)."""

    windows: Tensor  # [n_windows, ctx] int64
    keep: Tensor  # [n_windows, ctx] bool: a real-text position (special tokens are never encoded)
    acts: Tensor  # [n_tokens, d_in] float32, raw (un-normalised) activations at the hook
    where: Tensor  # [n_tokens, 2] (window, position) of each row, in row-major order
    row_of: Tensor  # [n_windows, ctx] int64: the row of `acts` at each position, -1 at special tokens


@dataclass
class DashboardData:
    summary: dict[str, Any]  # small: metrics, the density histogram, the chosen latents' list
    latents: list[dict[str, Any]]  # one record per chosen latent, written as its own file


def _sig(value: float, digits: int = 4) -> float:
    """Rounded to `digits` significant digits: the JSON stays small and readable."""
    return float(f"{float(value):.{digits}g}")


def select_windows(windows: Tensor, keep: Tensor, tokens: int) -> int:
    """How many leading windows hold at least `tokens` real-text tokens (all of them if fewer)."""
    counts = keep.sum(1).cumsum(0)
    return min(int(torch.searchsorted(counts, torch.tensor(tokens))) + 1, len(windows))


def held_out(stream, tokens: int, reads: list[str] | None = None) -> tuple[HeldOut, Any]:
    """The first held-out windows of the stream holding `tokens` real-text tokens and their activations at the
    sites the SAE reads (default: the model's hooks; the stream is opened held-out only: no set-up, no training
    text tokenised)."""
    from saelab.data.activations import activation_chunks
    from saelab.data.tokens import keep_mask

    model, datamodule, data_cfg = stream.model, stream.datamodule, stream.datamodule.cfg
    windows = datamodule.windows(train=False)["eval"]
    keep = keep_mask(windows, datamodule.special)
    n = select_windows(windows, keep, tokens)
    windows, keep = windows[:n], keep[:n]
    chunks = activation_chunks(model, windows, datamodule.special, int(data_cfg["model_batch_size"]),
                               hooks=reads or list(model.hooks))  # a crosscoder's sites side by side
    acts = torch.cat(list(chunks))
    where = keep.nonzero()
    if len(acts) != len(where):
        raise RuntimeError(f"{len(acts)} activations for {len(where)} real-text positions")
    row_of = torch.full(windows.shape, -1, dtype=torch.long)
    row_of[where[:, 0], where[:, 1]] = torch.arange(len(where))
    return HeldOut(windows, keep, acts, where, row_of), datamodule.special


def encode_batches(sae, acts: Tensor, batch: int):
    """sae.encode over `acts` in row batches (no gradients)."""
    with torch.inference_mode():
        for start in range(0, len(acts), batch):
            yield start, sae.encode(acts[start : start + batch])


def firing_stats(sae, acts: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """(firing count, maximum activation) of every latent over `acts`."""
    d_sae = int(sae.cfg["d_sae"])
    fires = torch.zeros(d_sae, dtype=torch.long)
    peak = torch.zeros(d_sae)
    for _, f in encode_batches(sae, acts, batch):
        fires += (f > 0).sum(0)
        peak = torch.maximum(peak, f.amax(0))
    return fires, peak


def choose_latents(spec: LatentSpec, fires: Tensor, seed: int) -> list[tuple[int, str]]:
    """(id, why) for each latent that gets a page: listed ids, then the `top` most frequently firing (ties by id),
    then `random` others drawn uniformly (seeded) from all the rest, dead latents included."""
    chosen: dict[int, str] = {i: "listed" for i in spec.listed}
    order = torch.sort(fires, descending=True, stable=True).indices  # ties: the lower id first
    for i in order[: spec.top].tolist():
        chosen.setdefault(i, "top")
    free = torch.ones(len(fires), dtype=torch.bool)
    free[list(chosen)] = False
    rest = free.nonzero().squeeze(1)
    if spec.random and len(rest):
        picks = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[: spec.random]]
        for i in sorted(picks.tolist()):
            chosen[i] = "random"
    return list(chosen.items())


def latent_columns(sae, acts: Tensor, ids: Sequence[int], batch: int) -> Tensor:
    """[n_tokens, len(ids)]: the chosen latents' activations on every held-out token."""
    index = torch.tensor(list(ids), dtype=torch.long)
    out = torch.empty(len(acts), len(index))
    for start, f in encode_batches(sae, acts, batch):
        out[start : start + len(f)] = f[:, index]
    return out


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, spaces included, from decoding growing prefixes (right for byte-level BPE and
    WordPiece alike); a token whose prefix decoding is not an extension falls back to its own decoding."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), clean_up_tokenization_spaces=False)
        pieces.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode([int(ids[i])]))
        previous = text
    return pieces


def top_contexts(column: Tensor, data: HeldOut, n: int, window: int, tokenizer, special_ids: frozenset[int]
                 ) -> list[dict[str, Any]]:
    """The `n` held-out windows where the latent reaches its highest values (one context per window), each as
    the tokens within `window` of that window's maximum with their activations (None at special tokens)."""
    n_windows, ctx = data.windows.shape
    best = torch.full((n_windows,), -math.inf).scatter_reduce(0, data.where[:, 0], column, reduce="amax")
    best[best <= 0] = -math.inf  # a window where the latent never fires is no context
    k = min(n, int(torch.isfinite(best).sum()))
    order = torch.sort(best, descending=True, stable=True).indices[:k].tolist()  # ties: the earlier window
    contexts = []
    for w in order:
        rows = data.row_of[w]
        values = torch.where(rows >= 0, column[rows.clamp_min(0)], torch.tensor(-math.inf))
        p = int(torch.argmax(values))  # the first position holding the window's maximum
        lo, hi = max(0, p - window), min(ctx, p + window + 1)
        ids = data.windows[w, lo:hi].tolist()
        acts = [None if int(rows[q]) < 0 else _sig(column[int(rows[q])]) for q in range(lo, hi)]
        contexts.append({
            "window": w, "pos": p, "max": _sig(best[w]), "center": p - lo, "ids": ids,
            # decoded after the token before the snippet, so a cut word's continuation reads right ("bit", not "##bit")
            "tokens": token_pieces(tokenizer, data.windows[w, lo - 1 : hi].tolist())[1:] if lo > 0
            else token_pieces(tokenizer, ids), "acts": acts,
            "special": [i in special_ids for i in ids], "cut_left": lo > 0, "cut_right": hi < ctx,
        })
    return contexts


def activation_histogram(column: Tensor, bins: int) -> dict[str, list]:
    """Counts of the latent's nonzero activations in `bins` equal bins from 0 to its maximum."""
    nonzero = column[column > 0].double().numpy()
    if len(nonzero) == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(nonzero, bins=bins, range=(0.0, float(nonzero.max())))
    return {"edges": [_sig(e) for e in edges], "counts": counts.tolist()}


def density_histogram(fires: Tensor, n_tokens: int) -> dict[str, Any]:
    """log10 firing density of all latents in quarter-decade bins, from the lowest measurable density
    (1 / n_tokens) to 1; dead latents (never fired) counted apart."""
    alive = fires[fires > 0].double() / n_tokens
    lo = -math.ceil(math.log10(max(n_tokens, 10)))
    edges = np.arange(lo, 0.0001, 0.25)
    counts, _ = np.histogram(np.log10(alive.numpy()), bins=edges)
    return {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist(),
            "dead": int((fires == 0).sum()), "total": len(fires)}


def logit_effects(model, w_dec: Tensor, ids: Sequence[int], k: int) -> tuple[list[dict] | None, str | None]:
    """Per chosen latent, the vocabulary tokens whose logits its decoder row raises and lowers most through the
    unembedding alone (W_dec[i] @ W_U: the direct path, skipping later blocks and the final norm); or None and
    the reason, for models without a next-token head."""
    from saelab.metrics.spliced import is_causal_lm

    name = model.name
    if not is_causal_lm(model):
        return None, (f"{name} is not a causal language model (an encoder: no trained next-token head), so no "
                      "logit effects are shown.")
    w_u = getattr(model.bridge, "W_U", None)
    if w_u is None or w_u.shape[0] != w_dec.shape[1]:
        return None, f"{name} has no unembedding of width {w_dec.shape[1]} to project decoder rows through."
    w_u = w_u.detach().float().cpu()
    tok = model.tokenizer
    effects = []
    for start in range(0, len(ids), 64):
        chunk = list(ids[start : start + 64])
        logits = w_dec[chunk].float() @ w_u
        up, down = logits.topk(k, dim=1), (-logits).topk(k, dim=1)
        for r in range(len(chunk)):
            effects.append({
                "up": [{"id": int(i), "token": tok.decode([int(i)]), "value": _sig(v)}
                       for v, i in zip(up.values[r].tolist(), up.indices[r].tolist(), strict=True)],
                "down": [{"id": int(i), "token": tok.decode([int(i)]), "value": _sig(-v)}
                         for v, i in zip(down.values[r].tolist(), down.indices[r].tolist(), strict=True)],
            })
    return effects, None


def collect(plan: Plan) -> DashboardData:
    """Load the model and the SAE, encode the held-out text and gather everything the pages show."""
    from saelab.run.stream import Reader, open_one_stream
    from saelab.saes.saelens_format import load_exported

    opts: Options = plan.options
    started = time.time()
    sae = load_exported(plan.sae_dir).float().cpu().eval()
    d_in, d_sae = int(sae.cfg["d_in"]), int(sae.cfg["d_sae"])
    # A text source (plan.make_plan refuses others) and data.cache off (plan.make_plan): the run pipeline's model.
    sites = plan.sites
    stream = open_one_stream({"model": plan.model, "data": plan.data, "eval": {"tokens": opts.tokens}, "seed": 0},
                             Reader(sites.hook, None, d_in // len(sites.reads), sites=sites), held_out_only=True)
    model = stream.model
    loaded = time.time()
    data, special = held_out(stream, opts.tokens, list(sites.reads))
    n_tokens = len(data.acts)
    if n_tokens == 0:
        raise ConfigError("data", str(plan.data.get("source")), "held-out text with at least one real token")
    generated = time.time()
    batch = max(1, min(opts.batch_size, MAX_ENCODE_FLOATS // d_sae))
    fires, peak = firing_stats(sae, data.acts, batch)
    chosen = choose_latents(opts.latents, fires, opts.seed)
    ids = [i for i, _ in chosen]
    written = sites.writes if sites.cross_layer else sites.reads  # a CLT's blocks: one an output layer
    site_w_dec = sae.W_dec.cpu().view(d_sae, len(written), -1)  # [d_sae, sites, d]: one block a site
    # the last site's decoder; a CLT's every output layer adds to the residual stream: their sum
    direction = site_w_dec.sum(1) if sites.cross_layer else site_w_dec[:, -1]
    effects, logit_note = logit_effects(model, direction, ids, opts.logit_tokens)

    records = []
    per_pass = max(1, MAX_COLUMN_FLOATS // n_tokens)
    for start in range(0, len(chosen), per_pass):
        part = chosen[start : start + per_pass]
        columns = latent_columns(sae, data.acts, [i for i, _ in part], batch)
        for j, (latent, why) in enumerate(part):
            column = columns[:, j]
            fired = column[column > 0]
            records.append({
                "id": latent, "chosen_by": why, "fires": int(fires[latent]),
                "density": _sig(int(fires[latent]) / n_tokens), "max": _sig(peak[latent]),
                "mean": _sig(fired.mean()) if len(fired) else 0.0,
                "histogram": activation_histogram(column, opts.bins),
                "contexts": top_contexts(column, data, opts.contexts, opts.window, model.tokenizer,
                                         special.excluded),
                "logits": effects[start + j] if effects is not None else None,
                "site_norms": ({h: _sig(n) for h, n in zip(written, site_w_dec[latent].norm(dim=-1).tolist(),
                                                            strict=True)} if sites.several else None),
            })
    log.info("dashboard: %d held-out tokens (%d windows) at %s; model and SAE loaded in %.1f s, activations in "
             "%.1f s, %d latents encoded in %.1f s", n_tokens, len(data.windows), plan.hook, loaded - started,
             generated - loaded, len(records), time.time() - generated)

    metrics = plan.metrics or {}
    summary = {
        "title": plan.run_dir.name if plan.run_dir is not None else plan.sae_dir.name,
        "source": str(plan.source),
        "run_dir": str(plan.run_dir) if plan.run_dir is not None else None,
        "sae": {"architecture": sae.cfg["architecture"], "d_in": d_in, "d_sae": d_sae,
                "hook": ", ".join(sites.reads),
                "model_name": sae_field(sae.cfg, "model_name") or str(plan.model.get("name"))},
        "model": str(plan.model.get("name")),
        "data": {"source": str(plan.data.get("source")), "path": plan.data.get("path"),
                 "context_size": int(plan.data["context_size"])},
        "held_out": {"tokens": n_tokens, "windows": len(data.windows)},
        "metrics": {k: metrics[k] for k in registry.shown("dashboard") if isinstance(metrics.get(k), (int, float))},
        "all_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "variant": metrics.get("variant"),
        "density": density_histogram(fires, n_tokens),
        "latents": [{k: r[k] for k in ("id", "chosen_by", "density", "max", "fires")} for r in records],
        "logit_note": logit_note,
        "pad": max(5, len(str(d_sae - 1))),
        "options": {"latents": opts.latents.__dict__ | {"listed": list(opts.latents.listed)},
                    "tokens": opts.tokens, "contexts": opts.contexts, "window": opts.window,
                    "seed": opts.seed},
        "overrides": plan.overrides,
    }
    return DashboardData(summary, records)
