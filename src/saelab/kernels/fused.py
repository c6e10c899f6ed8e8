"""Fused training kernels: encoder, nonlinearity, sparsity term and decoder in one autograd Function.

They compute exactly the quantities of the plain PyTorch code in each variant (tests/test_step_equivalence.py
checks loss terms and gradients against a straightforward reference), but with fewer passes over the
[B, d_sae] latents and fewer fresh [B, d_sae] tensors:

* the encoder takes x and the folded bias b_enc - b_dec W_enc (see SAE.encoder_preacts), so no matmul
  computes a gradient for the input;
* the pre-activation is written once (addmm) and the nonlinearity is applied in place where possible;
* the backward pass writes the latent gradient into one reused buffer (SAE.workspace), adds the sparsity
  term's constant gradient inside the GEMM (addmm's bias), and masks it in place.

The elementwise passes between the matmuls and the sparse TopK/BatchTopK products (SparsePattern and the three
Functions after it) run where kernels/dispatch.py says: kernels/native.py's C++ on the CPU, kernels/triton_gpu.py's
Triton on CUDA (without a host synchronisation), torch operators otherwise. The matmuls are torch's everywhere.

Used in float (no autocast) training on 2-D batches; the variants fall back to autograd otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from saelab.kernels import dispatch, native

# Built per step by SparsePattern; the CSR products used here are stable, so the one-time notice is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


def _keep_where_positive(values: Tensor, sign_of: Tensor, out: Tensor) -> Tensor:
    """values * 1[sign_of > 0] in one float pass (out may alias values)."""
    return torch.ops.aten.threshold_backward.grad_input(values, sign_of, 0, grad_input=out)


def _encoder_grads(grads: list, need: tuple[bool, ...], g_pre: Tensor, x: Tensor, W_enc: Tensor) -> None:
    """Fill grads[0:3] (x, W_enc, b) of pi = x W_enc + b from dL/dpi, computing only what autograd needs."""
    if need[0]:
        grads[0] = g_pre @ W_enc.t()
    if need[1]:
        grads[1] = x.t() @ g_pre
    if need[2]:
        grads[2] = g_pre.sum(0)


class SquaredError(torch.autograd.Function):
    """E_b ||x_hat - x||^2 (summed over the last dimension, averaged over the others) in two passes instead of
    six: the difference is formed once and kept, the sum of squares is one dot product, and the backward
    pass is one scaling of the kept difference."""

    @staticmethod
    def forward(ctx: Any, x_hat: Tensor, x: Tensor) -> Tensor:
        diff = x_hat - x
        n_rows = diff.numel() // diff.shape[-1]
        ctx.diff, ctx.n_rows = diff, n_rows
        flat = diff.reshape(-1)
        return torch.dot(flat, flat) / n_rows

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        grad = ctx.diff * (2 * g / ctx.n_rows)
        need = ctx.needs_input_grad
        return (grad if need[0] else None), (-grad if need[1] else None)


class ReluL1Function(torch.autograd.Function):
    """(x_hat, f, ||f||_1 / B, fired) for f = ReLU(x W_enc + b), x_hat = f W_dec + b_dec; fired ([d_sae] bool) is
    None unless the Triton kernel found it on the way (with the bias, the ReLU and the penalty's sum)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b: Tensor, W_dec: Tensor, b_dec: Tensor,
                workspace: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        if dispatch.backend_for(x, W_enc, b, W_dec) == "triton":
            f = torch.mm(x, W_enc, out=workspace[0])
            total, fired = dispatch.triton_kernels().relu_forward(f, b)
            penalty = total.to(x.dtype) / x.shape[0]
        else:
            f = torch.addmm(b, x, W_enc, out=workspace[0]).relu_()
            penalty, fired = f.sum(-1).mean(), None
        x_hat = torch.addmm(b_dec, f, W_dec)
        ctx.save_for_backward(x, W_enc, W_dec, f)
        ctx.workspace = workspace[1]
        ctx.mark_non_differentiable(f)
        ctx.set_materialize_grads(False)
        return x_hat, f, penalty, fired

    @staticmethod
    def backward(ctx: Any, g_xhat: Tensor | None, _g_f: Tensor | None, g_pen: Tensor | None, _g_fired: Tensor | None):
        x, W_enc, W_dec, f = ctx.saved_tensors
        batch = f.shape[0]
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 6
        if g_xhat is None and g_pen is None:
            return tuple(grads)
        g = ctx.workspace
        pen = (g_pen / batch).to(f.dtype) if g_pen is not None else f.new_zeros(())
        if g_xhat is not None:
            torch.addmm(pen, g_xhat, W_dec.t(), out=g)  # dL/df, with the L1 term's constant gradient
            if need[3]:
                grads[3] = f.t() @ g_xhat
            if need[4]:
                grads[4] = g_xhat.sum(0)
        else:
            g.copy_(pen.expand_as(g))
        _keep_where_positive(g, f, out=g)  # ReLU: zero where f == 0
        _encoder_grads(grads, need, g, x, W_enc)
        return tuple(grads)


class JumpReLUL0Function(torch.autograd.Function):
    """(x_hat, f, L0, fired) for f = pi H(pi - theta), pi = x W_enc + b, L0 = E_b sum_i H(pi_i - theta_i); fired
    ([d_sae] bool: f > 0 on some token) is None unless the native kernel found it on the way.

    The gradients are saes/ste.py's JumpReLUFunction and StepFunction (ste_to_preacts false) summed:
    d/dpi = g_f H; d/dtheta = -sum_b K((pi - theta)/eps)/eps (theta g_f + g_L0 / B), one kernel window.
    The kernel is zero outside a narrow band around theta, so the forward pass keeps only the (token, latent)
    entries inside it (and their kernel values); the backward pass reduces over those entries alone. On the
    CPU in float32 (with theta > 0, as the SAE keeps it) the forward after the matmul is one native pass
    (native.jumprelu_forward: bias, f, L0, the window and the firing mask); otherwise torch operators make
    the same in several passes, pi overwritten by f.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b: Tensor, theta: Tensor, W_dec: Tensor, b_dec: Tensor,
                bandwidth: float, kernel: str, workspace: tuple[Tensor, Tensor]
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        backend = dispatch.backend_for(x, W_enc, b, theta)
        ctx.bandwidth, ctx.kernel, ctx.backend = bandwidth, kernel, backend
        ctx.set_materialize_grads(False)
        if backend == "triton":  # pre keeps p = x W_enc + b for the backward, which recomputes the window from it
            pre = torch.mm(x, W_enc, out=workspace[0])
            n_active, fired = dispatch.triton_kernels().jumprelu_forward(pre, b, theta, out=workspace[1])
            f = workspace[1]
            x_hat = torch.addmm(b_dec, f, W_dec)
            ctx.save_for_backward(x, W_enc, theta, W_dec, f, pre)
            ctx.mark_non_differentiable(f)
            return x_hat, f, n_active.to(x.dtype) / x.shape[0], fired
        # The kernel window: K = 1[|u| < 1/2] (rectangle) or max(0, 1 - |u|) (triangle), u = (pi - theta) / eps.
        width = 0.5 * bandwidth if kernel == "rectangle" else bandwidth
        # With theta > 0 (the SAE keeps it so), H(pi - theta) = 1[f > 0]: backward masks with f, and the native
        # pass applies; otherwise backward needs the (slower) bool mask.
        # On an accelerator (host_sync_free) nothing is read back: theta's sign is not checked (backward keeps
        # the bool mask) and the window stays dense instead of a list of its entries (nonzero).
        sync_free, found = dispatch.host_sync_free(x), None
        theta_positive = not sync_free and bool(theta.min() > 0)
        if backend == "native" and theta_positive:
            pre = torch.mm(x, W_enc, out=workspace[0])
            found = native.jumprelu_forward(pre, b, theta, width, bandwidth, out=workspace[1])
            if found is None:
                pre.add_(b)
        else:
            pre = torch.addmm(b, x, W_enc, out=workspace[0])
        if found is not None:  # f in workspace[1]; backward's dL/df then goes to workspace[0]
            n_active, fired, rows, cols, weights = found
            f, grad_buffer, active = workspace[1], workspace[0], None
            l0 = x.new_tensor(n_active / x.shape[0])
            band = (rows, cols, weights if kernel == "triangle" else None)
        else:
            shifted = torch.sub(pre, theta, out=workspace[1])  # pi - theta
            # f = pi H(pi - theta), in pi's buffer. Masking with a bool tensor costs ~5x a float pass on CPU, so
            # H comes from threshold_backward (grad * (self > 0)), here and in backward.
            active = shifted > 0
            l0 = torch.count_nonzero(active).to(x.dtype) / x.shape[0]
            f = _keep_where_positive(pre, shifted, out=pre)
            active = None if theta_positive else active
            band = None
            if ctx.needs_input_grad[3]:
                distance = shifted.abs_()  # |pi - theta|
                if sync_free:  # K(u) over the whole batch
                    band = ((distance < width).to(x.dtype) if kernel == "rectangle"
                            else (1.0 - distance / bandwidth).clamp_min_(0.0))
                else:
                    rows, cols = (distance < width).nonzero(as_tuple=True)
                    band = (rows, cols, 1.0 - distance[rows, cols] / bandwidth if kernel == "triangle" else None)
            fired, grad_buffer = None, workspace[1]
        x_hat = torch.addmm(b_dec, f, W_dec)
        ctx.save_for_backward(x, W_enc, theta, W_dec, f, active)
        ctx.band, ctx.workspace = band, grad_buffer
        ctx.mark_non_differentiable(f)
        return x_hat, f, l0, fired

    @staticmethod
    def backward(ctx: Any, g_xhat: Tensor | None, _g_f: Tensor | None, g_l0: Tensor | None, _g_fired: Tensor | None):
        if ctx.backend == "triton":
            return JumpReLUL0Function.triton_backward(ctx, g_xhat, g_l0)
        x, W_enc, theta, W_dec, f, active = ctx.saved_tensors
        batch, eps = f.shape[0], ctx.bandwidth
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 9
        g_f = torch.mm(g_xhat, W_dec.t(), out=ctx.workspace) if g_xhat is not None else None
        if need[3] and isinstance(ctx.band, Tensor):  # the dense window K(u) [B, m]
            per_entry = theta * g_f if g_f is not None else theta.new_zeros(())
            if g_l0 is not None:
                per_entry = per_entry + g_l0 / batch
            grads[3] = (ctx.band * per_entry).sum(0).to(theta.dtype) / -eps
        elif need[3]:
            rows, cols, weights = ctx.band
            per_entry = theta[cols] * g_f[rows, cols] if g_f is not None else theta.new_zeros(cols.shape)
            if g_l0 is not None:
                per_entry = per_entry + g_l0 / batch
            if weights is not None:
                per_entry = per_entry * weights
            grad_theta = torch.zeros_like(theta).index_add_(0, cols, per_entry.to(theta.dtype))
            grads[3] = grad_theta / -eps
        if g_f is None:
            return tuple(grads)
        if need[4]:
            grads[4] = f.t() @ g_xhat
        if need[5]:
            grads[5] = g_xhat.sum(0)
        if active is None:  # d f / d pi = H(pi - theta) = 1[f > 0] when theta > 0
            g_pre = _keep_where_positive(g_f, f, out=g_f)
        else:
            g_pre = g_f.mul_(active)
        _encoder_grads(grads, need, g_pre, x, W_enc)
        return tuple(grads)

    @staticmethod
    def triton_backward(ctx: Any, g_xhat: Tensor | None, g_l0: Tensor | None) -> tuple:
        """The same gradients from p (saved in place of the window): one Triton pass masks dL/df into dL/dp and
        reduces the threshold's STE gradient over the batch."""
        x, W_enc, theta, W_dec, f, pre = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 9
        g_f = g_xhat @ W_dec.t() if g_xhat is not None else None
        if need[4] and g_xhat is not None:  # before the kernel: f and g_xhat are read, not written, by it
            grads[4] = f.t() @ g_xhat
        grad_theta = dispatch.triton_kernels().jumprelu_backward(g_f, pre, theta, g_l0, ctx.bandwidth, ctx.kernel,
                                                                 need[3])
        if grad_theta is not None:
            grads[3] = grad_theta.to(theta.dtype)
        if g_f is None:
            return tuple(grads)
        if need[5]:
            grads[5] = g_xhat.sum(0)
        _encoder_grads(grads, need, g_f, x, W_enc)
        return tuple(grads)


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

    def __init__(self, rows: Tensor, latents: Tensor, batch_size: int, d_sae: int):
        self.rows, self.latents, self.batch_size, self.d_sae = rows, latents, batch_size, d_sae
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
               row_sq: bool = False) -> tuple[Tensor, Tensor | None]:
        """(Z table + bias - minus, a [B, n] tensor; and its rows' squared norms if row_sq): each token's entries'
        values times their rows of table ([d_sae, n]), summed; bias [n] and minus [B, n] are optional."""
        found = None
        if self.backend == "triton":
            found = dispatch.triton_kernels().sparse_decode(values, self.latents, self._row_offsets, table, bias,
                                                            minus, row_sq)
        elif self.backend == "native":
            found = native.sparse_decode(values, self.latents, self._row_offsets, table, bias, minus, row_sq)
        if found is not None:
            return found
        out = torch.nn.functional.embedding_bag(self.latents, table, self._row_offsets[:-1], mode="sum",
                                                per_sample_weights=values)  # reads only the used rows of table
        if bias is not None:
            out = out + bias
        if minus is not None:
            out = out - minus
        return out, (out.pow(2).sum(-1) if row_sq else None)

    def entry_dots(self, table: Tensor, dense: Tensor) -> Tensor:
        """(dense @ table^T)[row_j, latent_j] for every entry j, in entry order: table [d_sae, n], dense [B, n]."""
        if self.backend == "triton":
            return dispatch.triton_kernels().sampled_dot(self.rows, self.latents, table, dense)
        out = (native.sampled_dot(self.latents, self._row_offsets, table, dense.contiguous())
               if self.backend == "native" else None)
        if out is None:
            sampled = torch.sparse.sampled_addmm(self.transposed(table.new_zeros(self.rows.shape)), table,
                                                 dense.t(), beta=0)
            out = torch.empty_like(sampled.values()).index_copy_(0, self.order, sampled.values())
        return out

    def transpose_times(self, values: Tensor, dense: Tensor, transposed: bool = False, with_sums: bool = False,
                        shift: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(Z^T (dense - shift), as [d_sae, n] or, if transposed, [n, d_sae]; and Z's column sums if with_sums).
        shift ([n], optional) is subtracted from every row of dense without forming dense - shift."""
        found = None
        if self.backend == "triton":
            found = dispatch.triton_kernels().sparse_t_dense(self.order, self._latent_offsets, self.rows, values, dense,
                                                             transposed, with_sums, shift)
        elif self.backend == "native":
            found = native.sparse_t_dense(self.order, self._latent_offsets, self.rows, values, dense.contiguous(),
                                          transposed, with_sums, shift)
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
            grad_w, sums = pattern.transpose_times(g, x, transposed=True, with_sums=True, shift=shift)
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
        return pattern.decode(values, W_dec)[0]

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        values, W_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 3
        if need[0]:
            grads[0] = pattern.entry_dots(W_dec, g)  # W_dec[latent_j] . g[row_j]
        if need[1]:
            grads[1] = pattern.transpose_times(values, g)[0]
        return tuple(grads)


class SparseReconstructionError(torch.autograd.Function):
    """(E_b ||x_hat_b - x_b||^2, x_hat - x) for x_hat = Z W_dec + b_dec, Z sparse: SparseDecode, the bias and
    SquaredError in one pass over [B, d_in] (the difference is formed as the decoder accumulates; natively, its
    squared norm too). The difference is returned without a gradient (AuxK's residual is its negation).

    Backward with s = 2 g / B: d values_j = s W_dec[latent_j] . diff[row_j], dW_dec = Z^T (s diff) (s is folded
    into Z's 131k values, not the [B, d_in] difference), db_dec = s sum_b diff.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                pattern: SparsePattern) -> tuple[Tensor, Tensor]:
        diff, row_sq = pattern.decode(values, W_dec, bias=b_dec, minus=x, row_sq=True)
        ctx.save_for_backward(values, W_dec, diff)
        ctx.pattern = pattern
        ctx.mark_non_differentiable(diff)
        ctx.set_materialize_grads(False)
        return row_sq.sum() / diff.shape[0], diff

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, _g_diff: Tensor | None):
        grads: list[Tensor | None] = [None] * 5
        if g is None:
            return tuple(grads)
        values, W_dec, diff = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need = ctx.needs_input_grad
        scale = 2 * g / diff.shape[0]
        if need[0]:
            grads[0] = pattern.entry_dots(W_dec, diff) * scale
        if need[1]:
            grads[1] = pattern.transpose_times(values * scale, diff)[0]
        if need[2]:
            grads[2] = diff.sum(0) * scale
        if need[3]:  # training never asks for it (x is data)
            grads[3] = diff * -scale
        return tuple(grads)


class GatedFunction(torch.autograd.Function):
    """The Gated SAE's training forward (heaviside gate, tied encoder, l1 sparsity, decoder frozen in the
    gate's terms): returns (x_hat, f, ||ReLU(pi_gate)||_1 / B, aux_hat or None, fired).

        z = x W + shift_mag           pi_gate = x W + bias_gate      pi_mag = exp(r) z + b_mag
        f = H(pi_gate) ReLU(pi_mag)   x_hat = f W_dec + b_dec        aux_hat = ReLU(pi_gate) sg(W_dec) + sg(b_dec)

    The caller folds the centring into the biases: bias_gate = b_gate - sg(b_dec) W and shift_mag = -b_dec W,
    so b_dec's centring gradient reaches it only through the magnitude path, as GatedSAE.preacts arranges.
    One encoder matmul serves both paths, and the backward pass sums both paths' latent gradients before the
    one dW matmul. On the CPU in float32 the elementwise work between the matmuls is three native passes
    (native.gated_forward, gated_backward_mag, gated_backward_gate), which also give the firing mask ([d_sae]
    bool; None on the torch path) and the column sums; torch operators compute the same in ~12 passes.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, bias_gate: Tensor, shift_mag: Tensor, r_mag: Tensor,
                b_mag: Tensor, W_dec: Tensor, b_dec: Tensor, aux: bool,
                workspace: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        ws_z, ws_gate, ws_f, ws_mag, ws_grad_gate = workspace
        z = torch.mm(x, W_enc, out=ws_z)
        gain = r_mag.exp()
        mag_shift = shift_mag * gain + b_mag
        ctx.backend = backend = dispatch.backend_for(x, W_enc, bias_gate, W_dec)
        found = None
        if backend == "triton":
            found = dispatch.triton_kernels().gated_forward(z, bias_gate, gain, mag_shift, gate=ws_gate, pi_mag=ws_mag,
                                                            f=ws_f)
        elif backend == "native":
            found = native.gated_forward(z, bias_gate, gain, mag_shift, gate=ws_gate, pi_mag=ws_mag, f=ws_f)
        if found is not None:  # z is spent: backward's dL/df goes to its buffer
            total, fired = found
            gate, pi_mag, f, grad_mag_buffer = ws_gate, ws_mag, ws_f, ws_z
            penalty = (total.to(x.dtype) if isinstance(total, Tensor) else x.new_tensor(total)) / x.shape[0]
        else:
            gate = torch.add(z, bias_gate, out=ws_gate).relu_()  # ReLU(pi_gate); pi_gate > 0 <=> gate > 0
            pi_mag = torch.addcmul(mag_shift, z, gain, out=z)  # (z + shift) exp(r) + b_mag, one pass
            f = _keep_where_positive(pi_mag, gate, out=ws_f).relu_()  # H(pi_gate) ReLU(pi_mag)
            penalty = gate.sum(-1).mean()
            fired, grad_mag_buffer = None, ws_mag
        x_hat = torch.addmm(b_dec, f, W_dec)
        aux_hat = torch.addmm(b_dec, gate, W_dec) if aux else None
        ctx.save_for_backward(x, W_enc, gain, b_mag, W_dec, pi_mag, f, gate)
        ctx.workspace = (grad_mag_buffer, ws_grad_gate)
        ctx.mark_non_differentiable(f)
        ctx.set_materialize_grads(False)
        return x_hat, f, penalty, aux_hat, fired

    @staticmethod
    def backward(ctx: Any, g_xhat: Tensor | None, _g_f: Tensor | None, g_pen: Tensor | None,
                 g_aux: Tensor | None, _g_fired: Tensor | None):
        x, W_enc, gain, b_mag, W_dec, pi_mag, f, gate = ctx.saved_tensors
        batch = f.shape[0]
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 10
        ws_mag, ws_gate = ctx.workspace
        g_z = None
        if g_xhat is not None:  # magnitude path: dL/dpi_mag = g_f H ReLU'(pi_mag) = g_f 1[f > 0]
            g_mag = torch.mm(g_xhat, W_dec.t(), out=ws_mag)
            if need[6]:
                grads[6] = f.t() @ g_xhat
            if need[7]:
                grads[7] = g_xhat.sum(0)
            sums = _gated_backward_mag(ctx.backend, g_mag, f, pi_mag, gain)  # g_mag becomes dL/dz
            if sums is not None:
                grads_mag_sum, pi_mag_grad_sum = sums
                g_z = g_mag
            else:
                _keep_where_positive(g_mag, f, out=g_mag)
                grads_mag_sum = g_mag.sum(0)
                pi_mag_grad_sum = torch.mul(pi_mag, g_mag, out=ws_gate).sum(0) if need[4] else None
                g_z = g_mag.mul_(gain)
            if need[5]:
                grads[5] = grads_mag_sum
            if need[4]:  # d pi_mag / d r = exp(r) z = pi_mag - b_mag
                # sum_b (pi_mag - b_mag) g_mag = sum_b pi_mag g_mag - b_mag sum_b g_mag
                grads[4] = pi_mag_grad_sum - b_mag * grads_mag_sum
            if need[3]:
                grads[3] = grads_mag_sum * gain  # = g_z.sum(0), without another pass
        if g_pen is not None or g_aux is not None:  # gate path: (lambda / B + g_aux sg(W_dec)^T) ReLU'(pi_gate)
            pen = (g_pen / batch).to(gate.dtype) if g_pen is not None else gate.new_zeros(())
            if g_aux is not None:
                g_gate = torch.addmm(pen, g_aux, W_dec.t(), out=ws_gate)
            else:
                g_gate = ws_gate.copy_(pen.expand_as(ws_gate))
            sums = _gated_backward_gate(ctx.backend, g_gate, gate, g_z) if g_z is not None else None  # g_z += masked
            if sums is None:
                _keep_where_positive(g_gate, gate, out=g_gate)
                sums = g_gate.sum(0) if need[2] else None
                g_z = g_gate if g_z is None else g_z.add_(g_gate)
            if need[2]:
                grads[2] = sums
        if g_z is not None:
            if need[0]:
                grads[0] = g_z @ W_enc.t()
            if need[1]:
                grads[1] = x.t() @ g_z
        return tuple(grads)


def _gated_backward_mag(backend: str, *args: Tensor) -> tuple[Tensor, Tensor] | None:
    """gated_backward_mag of this backend's kernels; None on the torch backend (or where native declines)."""
    if backend == "triton":
        return dispatch.triton_kernels().gated_backward_mag(*args)
    return native.gated_backward_mag(*args) if backend == "native" else None


def _gated_backward_gate(backend: str, *args: Tensor) -> Tensor | None:
    """gated_backward_gate of this backend's kernels; None on the torch backend (or where native declines)."""
    if backend == "triton":
        return dispatch.triton_kernels().gated_backward_gate(*args)
    return native.gated_backward_gate(*args) if backend == "native" else None
