"""The sparse latent matrix of a TopK/BatchTopK step and its products: SparsePattern (where the entries are, and
the three products the step needs), SparseGather (the selected pre-activations' gradient) and SparseDecode (the
decoder of a sparse Z). The reconstruction error built on them is reconstruction.py's SparseReconstructionError.

The products run where kernels/dispatch.py says: kernels/native.py's C++ on the CPU, kernels/triton_gpu.py's
Triton launchers on CUDA (without a host synchronisation), torch operators otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from saelab.kernels import dispatch, native
from saelab.kernels.block_products import LayerSpan

# Built per step by SparsePattern; the CSR products used here are stable, so the one-time notice is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


class SparsePattern:
    """Where a sparse [B, d_sae] latent matrix Z has entries: (rows, latents), grouped by token (rows ascending),
    and the products the sparse step needs with it.

    On CPU in float32 these are kernels/native.py's kernels (sparse_kernels.cpp); on CUDA kernels/triton_gpu.py's;
    otherwise torch operators: the backward products then use the transpose Z^T as a CSR [d_sae, B] matrix, made
    canonical (rows ascending and distinct within each latent) by one stable sort of the entries by latent, shared
    by the encoder's and the decoder's backward. All three need the same grouping by latent (a counting sort
    natively, a stable sort and a binary search on the GPU, with no host synchronisation).
    """

    check_invariants = False  # tests turn this on to have torch verify the CSR structure

    def __init__(self, rows: Tensor, latents: Tensor, batch_size: int, d_sae: int,
                 encoder_span: LayerSpan | None = None, decoder_span: LayerSpan | None = None):
        self.rows, self.latents, self.batch_size, self.d_sae = rows, latents, batch_size, d_sae
        # A cross-layer transcoder's block structure (saes/cross_layer.py): the native products then skip the zero
        # blocks of W_enc (its gradient's, through x) and of W_dec. Elsewhere they are multiplied, and the zero
        # blocks' gradients are masked before the step, so every backend trains the same weights.
        self.encoder_span, self.decoder_span = encoder_span, decoder_span
        self.backend = dispatch.backend_for(latents)
        grouped = native.group_by(latents, d_sae) if self.backend == "native" else None
        if grouped is None:
            order = latents.argsort(stable=True)  # rows stay ascending per latent
            grouped = order, csr_offsets(latents.index_select(0, order), d_sae)
        self.order, self._latent_offsets = grouped
        self._row_offsets = csr_offsets(rows, batch_size)

    def transposed(self, values: Tensor) -> Tensor:
        """Z^T as a [d_sae, B] CSR matrix, for values given in entry order."""
        return torch.sparse_csr_tensor(self._latent_offsets, self.rows.index_select(0, self.order),
                                       values.index_select(0, self.order), (self.d_sae, self.batch_size),
                                       check_invariants=self.check_invariants)

    def decode(self, values: Tensor, table: Tensor, bias: Tensor | None = None, minus: Tensor | None = None,
               row_sq: bool = False, span: LayerSpan | None = None) -> tuple[Tensor, Tensor | None]:
        """(Z table + bias - minus, a [B, n] tensor; and its rows' squared norms if row_sq): each token's entries'
        values times their rows of table ([d_sae, n]), summed; bias [n] and minus [B, n] are optional; span: where
        table's rows are nonzero."""
        found = None
        if self.backend == "triton":
            found = dispatch.triton_kernels().sparse_decode(values, self.latents, self._row_offsets, table, bias,
                                                            minus, row_sq)
        elif self.backend == "native":
            found = native.sparse_decode(values, self.latents, self._row_offsets, table, bias, minus, row_sq, span)
        if found is not None:
            return found
        out = torch.nn.functional.embedding_bag(self.latents, table, self._row_offsets[:-1], mode="sum",
                                                per_sample_weights=values)  # reads only the used rows of table
        if bias is not None:
            out = out + bias
        if minus is not None:
            out = out - minus
        return out, (out.pow(2).sum(-1) if row_sq else None)

    def entry_dots(self, table: Tensor, dense: Tensor, span: LayerSpan | None = None) -> Tensor:
        """(dense @ table^T)[row_j, latent_j] for every entry j, in entry order: table [d_sae, n], dense [B, n];
        span: where table's rows are nonzero."""
        if self.backend == "triton":
            return dispatch.triton_kernels().sampled_dot(self.rows, self.latents, table, dense)
        out = (native.sampled_dot(self.latents, self._row_offsets, table, dense.contiguous(), span)
               if self.backend == "native" else None)
        if out is None:
            sampled = torch.sparse.sampled_addmm(self.transposed(table.new_zeros(self.rows.shape)), table,
                                                 dense.t(), beta=0)
            out = torch.empty_like(sampled.values()).index_copy_(0, self.order, sampled.values())
        return out

    def transpose_times(self, values: Tensor, dense: Tensor, transposed: bool = False, with_sums: bool = False,
                        shift: Tensor | None = None,
                        span: LayerSpan | None = None) -> tuple[Tensor, Tensor | None]:
        """(Z^T (dense - shift), as [d_sae, n] or, if transposed, [n, d_sae]; and Z's column sums if with_sums).
        shift ([n], optional) is subtracted from every row of dense without forming dense - shift. span: the
        entries of latent j's row of the product that the weight it is the gradient of can have (0 elsewhere,
        where the native kernel skips them)."""
        found = None
        if self.backend == "triton":
            found = dispatch.triton_kernels().sparse_t_dense(self.order, self._latent_offsets, self.rows, values, dense,
                                                             transposed, with_sums, shift)
        elif self.backend == "native":
            found = native.sparse_t_dense(self.order, self._latent_offsets, self.rows, values, dense.contiguous(),
                                          transposed, with_sums, shift, span)
        if found is not None:
            return found
        product = self.transposed(values) @ dense
        sums = torch.zeros(self.d_sae, dtype=values.dtype, device=values.device).index_add_(0, self.latents, values)
        if shift is not None:
            product = product - torch.outer(sums, shift)
        return (product.t().contiguous() if transposed else product), (sums if with_sums else None)


def csr_offsets(ids: Tensor, n: int) -> Tensor:
    """CSR offsets [n + 1] of entries grouped by id, ascending: offsets[i] = #(ids < i). A binary search, where
    bincount would size its output from the data (a host synchronisation on a GPU)."""
    return torch.searchsorted(ids, torch.arange(n + 1, device=ids.device, dtype=ids.dtype))


class SparseGather(torch.autograd.Function):
    """values_j = pi[rows_j, latents_j] for pi = (x - b_dec) W_enc + b_enc (b_dec None: no centring): the caller
    computed pi as x W_enc + (b_enc - b_dec W_enc) and gathered the values without autograd (the top-k search
    returns them); this attaches their gradient.

    The backward pass touches only the gathered entries. With G the sparse [B, d_sae] matrix of the values'
    gradients and s its column sums: dW_enc = (x - b_dec)^T G (one sparse product that subtracts s b_dec per
    latent, never forming x - b_dec), db_enc = s, db_dec = -W_enc s. Autograd would instead build the dense
    [B, d_sae] gradient, a dense [d_in, B] x [B, d_sae] matmul, and the outer product b_dec s^T of the folded
    bias's backward.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, values: Tensor,
                pattern: SparsePattern) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec)
        ctx.pattern = pattern
        return values.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        x, W_enc, b_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 6
        g = g.to(x.dtype)
        if need[1] or need[2] or need[3]:
            shift = b_dec.detach() if b_dec is not None else None
            grad_w, sums = pattern.transpose_times(g, x, transposed=True, with_sums=True, shift=shift,
                                                   span=pattern.encoder_span)
            grads[1] = grad_w if need[1] else None
            grads[2] = sums if need[2] else None
            if need[3]:
                grads[3] = -(W_enc.detach() @ sums)
        if need[0]:  # training never asks for it (x is data); kept simple
            dense = g.new_zeros(pattern.batch_size, pattern.d_sae).index_put_((pattern.rows, pattern.latents), g)
            grads[0] = dense @ W_enc.t()
        return tuple(grads)


class SparseDecode(torch.autograd.Function):
    """x_hat_b = sum_j values_j W_dec[latents_j] over token b's entries: the decoder of a sparse latent matrix Z.

    Backward: dW_dec = Z^T g and d values_j = W_dec[latent_j] . g_{row_j} (a dense product sampled at Z's
    entries); SparsePattern computes all three.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        return pattern.decode(values, W_dec, span=pattern.decoder_span)[0]

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        values, W_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 3
        if need[0]:
            grads[0] = pattern.entry_dots(W_dec, g, span=pattern.decoder_span)  # W_dec[latent_j] . g[row_j]
        if need[1]:
            grads[1] = pattern.transpose_times(values, g, span=pattern.decoder_span)[0]
        return tuple(grads)
