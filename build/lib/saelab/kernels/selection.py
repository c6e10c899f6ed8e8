"""Top-k selection for the TopK family: which latents a batch keeps, wherever the step runs.

The variants ask for a selection (each token's k largest, the batch's B k largest, a bf16-screened one) and this
module decides how it runs, so no variant file names a backend: kernels/native.py's C++ kernels on the CPU in
float32, torch operators elsewhere; and, where dispatch.host_sync_free says a step must not wait for the device,
shapes that never depend on the data. Every path selects exactly the same entries (ties aside).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from saelab.kernels import dispatch, native

Screen = native.Screen  # a bfloat16 stand-in for x W + bias that exact selection can settle (see native.Screen)

CANDIDATE_GROUP = 8  # per_token_topk's prefilter: groups of 8 latents (a speed knob; exact either way)
# The most entries one torch.topk call sees. PyTorch's CUDA topk runs its multi-block kernel only with 32-bit index
# math; above that one block scans the whole input (~1 s at 16,384 x 262,144), so larger inputs go in pieces.
TOPK_MAX_ELEMENTS = 2**31 - 1
# batch_topk's torch fallback searches entries above 0.8 theta first, then above lower cutoffs, then all (exact).
CANDIDATE_FRACTIONS = (0.8, 0.4, 0.1)


def fixed_shapes(t: Tensor) -> bool:
    """Whether a selection on t's device must keep shapes that do not depend on the data (no nonzero, no count read
    back): on an accelerator each such read stalls the host; on the CPU it costs nothing (dispatch.host_sync_free)."""
    return dispatch.host_sync_free(t)


def selection_adds_bias(x: Tensor, bias: Tensor) -> bool:
    """Whether per_token_topk and batch_topk over scores made from x (x W) add `bias` as they scan (the C++
    kernels do), so the matmul that makes the scores may leave it out (a pass over [B, d_sae] saved)."""
    return native.usable(x, bias)


@torch.no_grad()
def chunked_topk(scores: Tensor, k: int) -> Tensor:
    """Indices (unordered) of the k largest entries of the 1-D scores, with no topk call over more than
    TOPK_MAX_ELEMENTS entries: each chunk's top k, then the top k of those candidates (again in chunks while they
    are too many; a full chunk halves at least). Exact: an entry outside its chunk's top k has k entries at
    least as large, so it cannot beat the k-th largest overall (only tie it). A k above half the limit (chunks
    would barely shrink) takes one topk; B k is far below that at any real shape."""
    limit, n = TOPK_MAX_ELEMENTS, scores.numel()
    if n <= limit or k > limit // 2:
        return scores.topk(k, sorted=False).indices
    ids = torch.cat([scores[start:start + limit].topk(min(k, n - start), sorted=False).indices + start
                     for start in range(0, n, limit)])
    return ids[chunked_topk(scores[ids], k)]


def per_token_topk(scores: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """per_token_topk_rows over blocks of rows of at most TOPK_MAX_ELEMENTS entries each (rows are independent, so
    the result is the same; see chunked_topk for why)."""
    batch, width = scores.shape
    block = max(1, TOPK_MAX_ELEMENTS // max(width, 1))
    if batch <= block:
        return per_token_topk_rows(scores, k, bias)
    parts = [per_token_topk_rows(scores[start:start + block], k, bias) for start in range(0, batch, block)]
    rows = torch.cat([part[0] + start for part, start in zip(parts, range(0, batch, block), strict=True)])
    return rows, torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])


def per_token_topk_rows(scores: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, latent ids, scores) of each token's k largest scores (+ bias [d_sae], if given), grouped by token.

    On CPU in float32 this is native.row_topk (sparse_kernels.cpp, several times faster than the fallback).
    torch.topk over every [d_sae] row costs about half the encoder matmul on CPU, so the fallback narrows the
    search first: split each row into d_sae / 8 groups of 8 (columns g, g + d_sae/8, ...; a max over the middle
    dimension vectorises), keep the k groups with the largest maxima, and take the top k of those 8k
    candidates. Exact: a group outside those k has a max no larger than the k-th group max, and the k kept
    groups hold k entries at least that large, so no entry outside them can beat the k-th largest (only tie it).
    """
    batch, width = scores.shape
    group = CANDIDATE_GROUP
    found = native.row_topk(scores, k, bias)
    if found is None and bias is not None:
        scores = scores + bias
    if found is not None:
        ids, values = found
        if scores.requires_grad:  # the kernel's values carry no gradient
            values = scores.gather(1, ids)
    elif width % group == 0 and width // group >= 2 * k:
        n_groups = width // group
        group_max = scores.reshape(batch, group, n_groups).amax(1)
        groups = group_max.topk(k, dim=-1, sorted=False).indices
        columns = (groups.unsqueeze(-1) + n_groups * torch.arange(group, device=scores.device)).flatten(1)
        top = scores.gather(1, columns).topk(k, dim=-1, sorted=False)
        ids, values = columns.gather(1, top.indices), top.values
    else:
        values, ids = scores.topk(k, dim=-1, sorted=False)
    rows = torch.arange(batch, device=scores.device).repeat_interleave(k)
    return rows, ids.flatten(), values.flatten()


def batch_topk(scores: Tensor, keep: int, bias: Tensor | None = None, theta: Tensor | None = None,
               theta_batches: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(flat indices in ascending order, i.e. grouped by token; values) of the `keep` largest entries of scores
    (+ bias [d_sae], if given). theta is a running estimate of the cutoff (BatchTopK's threshold), used once
    theta_batches > 0.

    On CPU in float32 this is native.batch_topk (sparse_kernels.cpp), which estimates its own cutoff from a
    sample. The fallback here: a topk over all B*d_sae entries costs about as much as the encoder matmul
    (0.11 s at B 2048, d_sae 3072, one CPU core). Entries at or below a cutoff c can only be kept if fewer
    than `keep` lie above it, so with c = 0.8 theta the topk runs over the few entries above c (0.016 s). While the
    pre-activations shift (early in training, at a high learning rate) theta can lag above this batch's
    threshold; the lower cutoffs then still avoid the full topk, the last resort. A step that must keep fixed
    shapes skips the search (its candidate count depends on the data).
    """
    found = native.batch_topk(scores, keep, bias)
    if found is not None:
        ids, values = found
        return ids, (scores.flatten()[ids] if scores.requires_grad else values)  # the kernel's carry no gradient
    flat = (scores if bias is None else scores + bias).flatten()
    ids = None
    if not fixed_shapes(flat) and theta is not None and theta_batches is not None and theta_batches > 0:
        for fraction in CANDIDATE_FRACTIONS:
            candidates = (flat > fraction * theta).nonzero().squeeze(1)
            if candidates.numel() >= keep:
                ids = candidates[chunked_topk(flat[candidates], keep)]
                break
    if ids is None:
        ids = chunked_topk(flat, keep)
    ids = ids.sort().values
    return ids, flat[ids]


def bf16_screen(x: Tensor, W: Tensor, bias: Tensor, enabled: bool, buffer: Callable[[], Tensor]) -> Screen | None:
    """The bfloat16 screen of x W + bias (native.Screen), or None where it does not apply: `enabled` false, not
    float32 CPU tensors the C++ kernels take, or a CPU without bf16 dot products (there a bf16 matmul is slower).
    Asked before `buffer` (its [B, d_sae] bf16 output) is made, so a GPU step never allocates one."""
    float32 = x.dtype == W.dtype == bias.dtype == torch.float32
    if not (enabled and float32 and native.usable(x, W, bias) and native.fast_bf16()):
        return None
    return native.bf16_screen(x, W, bias, out=buffer())


def screened_row_topk(screen: Screen, k: int) -> tuple[Tensor, Tensor, int] | None:
    """(ids [B, k], values [B, k], exact values computed) of each row's k largest of the exact x W + bias, found
    through the screen; None if the kernel declined."""
    return native.screened_row_topk(screen, k)


def screened_batch_topk(screen: Screen, keep: int) -> tuple[Tensor, Tensor, int] | None:
    """(flat ids, values, exact values computed) of the `keep` largest of the exact x W + bias, found through the
    screen; None if the kernel's cutoffs all failed (then the float32 matmul must decide)."""
    return native.screened_batch_topk(screen, keep)
