"""Is a full-size step right where its offsets are largest? A slice of it, recomputed with plain torch.

At the shapes researchers train at (16,384 tokens x 262,144 latents; 2^20 latents x d_in 2,304) a kernel that
forms its offsets in 32 bits writes past 2^31 elements to the wrong place, and nothing at small shapes shows it.
The slice is where those offsets are largest, and its reference needs only a few rows or latents of memory:

* latents of the last `rows` tokens (relu, gated, jumprelu, topk: row-local), against the variant's own
  `encode` (the evaluation path: torch operators, no fused kernel) on those tokens;
* for TopK and BatchTopK, the gradients of the `latents` highest-numbered selected latents, W_dec's rows and
  W_enc's columns, against the SPEC's closed form for the reconstruction term E_b ||x - x_hat||^2 (AuxK is
  zero while no latent is dead, which the caller ensures with a long dead window):
      dL/dx_hat_b = 2 (x_hat_b - x_b) / B,   dL/dW_dec[l] = sum_b f_bl dL/dx_hat_b,
      dL/dW_enc[:, l] = sum_{b: f_bl > 0} (x_b - b_dec) (W_dec[l] . dL/dx_hat_b).

`check_slice` returns the largest relative errors and whether each is within `tolerance` (TF32 matmuls round
at ~1e-3 relative; an offset error gives O(1)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from saelab.saes.decoder_rescale import weights_once

ROW_LOCAL = ("relu", "gated", "jumprelu", "topk")  # latents of a token depend on that token alone
SPARSE_GRADIENTS = ("topk", "batchtopk")  # one reconstruction term: the closed form above applies


def slice_errors(result: dict[str, Any]) -> str:
    """The slice's errors as one short text, e.g. "latents 0.0e+00, w_dec_grad 1.5e-07"."""
    return ", ".join(f"{k.removeprefix('slice_').removesuffix('_error')} {v:.1e}" for k, v in result.items()
                     if k.startswith("slice_") and k.endswith("_error"))


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max(max |want|, 1e-6), in float64."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6)) if want.numel() else 0.0


def check_slice(variant: str, sae: Any, x: Tensor, coefficients: Mapping[str, float], rows: int = 64,
                latents: int = 64, tolerance: float = 2e-2) -> dict[str, Any]:
    """One fused training forward and backward of `sae` on x (what the step runs, on whatever kernels dispatch
    picks), then the slice's errors against torch. Gradients are cleared first and left set. A rescaled SAE
    (sae.decoder_constraint=rescale) is checked on the unit-norm weights its kernels see."""
    sae.zero_grad(set_to_none=True)
    with weights_once(sae):
        weights = {name: getattr(sae, name) for name in ("W_enc", "W_dec")}
        for weight in weights.values():
            if not weight.is_leaf:
                weight.retain_grad()
        out = sae.training_loss(x, coefficients)
    sum(out.terms.values()).backward()
    result: dict[str, Any] = {"slice_rows": rows, "slice_latents": latents, "slice_tolerance": tolerance}
    with torch.no_grad():
        if variant in ROW_LOCAL:
            tail = slice(x.shape[0] - rows, x.shape[0])
            got = out.latents[tail] if isinstance(out.latents, Tensor) else _dense_rows(out.latents, tail)
            result["slice_latents_error"] = relative_error(got, sae.encode(x[tail]))
        if variant in SPARSE_GRADIENTS:
            result |= _sparse_gradient_errors(sae, weights, x, out.latents, latents)
    errors = [v for k, v in result.items() if k.endswith("_error")]
    result["slice_ok"] = bool(errors) and max(errors) <= tolerance
    result["slice_errors"] = slice_errors(result)  # as text: the GPU check's report reads it without torch
    return result


def _dense_rows(active: Any, rows: slice) -> Tensor:
    """Rows [start, stop) of a sparse ActiveLatents as a dense [stop - start, d_sae] tensor."""
    keep = (active.rows >= rows.start) & (active.rows < rows.stop)
    out = active.values.new_zeros(rows.stop - rows.start, active.d_sae)
    return out.index_put_((active.rows[keep] - rows.start, active.latents[keep]), active.values[keep])


def _sparse_gradient_errors(sae: Any, weights: Mapping[str, Tensor], x: Tensor, active: Any, n_latents: int
                            ) -> dict[str, float]:
    """W_dec's and W_enc's gradients (`weights`: the tensors the step used) at the highest-numbered selected
    latents against the closed form."""
    chosen = active.latents[active.values > 0].unique()[-n_latents:]  # ascending: the largest offsets
    entries = torch.isin(active.latents, chosen)
    need_rows = active.rows[entries].unique()
    of_rows = torch.isin(active.rows, need_rows)
    x_hat = sae.b_dec.expand(x.shape[0], -1).clone()  # decoded only where needed: rows touching chosen latents
    x_hat.index_add_(0, active.rows[of_rows], active.values[of_rows, None] * sae.W_dec[active.latents[of_rows]])
    g = 2.0 * (x_hat - x) / x.shape[0]  # dL/dx_hat (zero-cost rows are never read)
    rows, ids, values = active.rows[entries], active.latents[entries], active.values[entries]
    column = torch.searchsorted(chosen, ids)
    want_dec = torch.zeros(len(chosen), sae.W_dec.shape[1], dtype=torch.float64, device=x.device)
    want_dec.index_add_(0, column, (values[:, None] * g[rows]).double())
    g_value = (g[rows] * sae.W_dec[ids]).sum(1) * (values > 0)
    want_enc = torch.zeros(len(chosen), sae.W_enc.shape[0], dtype=torch.float64, device=x.device)
    want_enc.index_add_(0, column, (g_value[:, None] * sae.centre(x)[rows]).double())
    return {"slice_w_dec_grad_error": relative_error(weights["W_dec"].grad[chosen], want_dec),
            "slice_w_enc_grad_error": relative_error(weights["W_enc"].grad[:, chosen].t(), want_enc)}
