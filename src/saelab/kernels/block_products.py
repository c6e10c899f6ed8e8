"""A cross-layer transcoder's block structure as the step's kernels use it: LayerSpan (which columns a latent's
rows can have, for the sparse products of TopK/BatchTopK: native.py skips the rest), and the five matmuls of a
dense training step (fused_relu.py), for a dense weight and for a CLT's block weights.

A dense SAE's step multiplies x W_enc, f W_dec, and in backward g W_dec^T, f^T g and x^T g. A CLT over L layers
stores W_enc [L d, L F] block-diagonal and W_dec [L F, L d] block-upper-triangular (saes/cross_layer.py), and
the zero blocks are a 1 - 1/L share of W_enc and (L - 1) / 2L of W_dec: multiplying them is most of a dense
step's work. BlockProducts runs the same five products over the weight blocks alone, each a matmul of the
per-layer shape written into its slice of the output (BLAS writes a strided slice directly), and leaves a weight
gradient's zero blocks at 0 (they are masked before the step in any case).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LayerSpan(NamedTuple):
    """A cross-layer transcoder's block structure, which lets the sparse products skip its zero blocks: latent j
    (of group g = j // group, its layer) has a nonzero table row, or output row, only on the columns
    [g step, (g + 1) step), or [g step, end) if suffix (a CLT's decoder: its layer and every later one)."""

    group: int  # latents per layer
    step: int  # columns per layer
    suffix: bool


NO_SPAN = LayerSpan(0, 0, False)


class DenseProducts:
    """The matmuls of a dense weight (every SAE but a CLT)."""

    def encode(self, x: Tensor, W_enc: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """x W_enc (+ bias), into out if given."""
        if bias is None:
            return torch.mm(x, W_enc, out=out)
        return torch.addmm(bias, x, W_enc, out=out)

    def decode(self, f: Tensor, W_dec: Tensor, bias: Tensor) -> Tensor:
        """f W_dec + bias."""
        return torch.addmm(bias, f, W_dec)

    def decode_t(self, g: Tensor, W_dec: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """g W_dec^T (+ bias), into out if given: the latents' gradient."""
        if bias is None:
            return torch.mm(g, W_dec.t(), out=out)
        return torch.addmm(bias, g, W_dec.t(), out=out)

    def decoder_grad(self, f: Tensor, g: Tensor) -> Tensor:
        """f^T g: W_dec's gradient."""
        return f.t() @ g

    def encoder_grad(self, x: Tensor, g: Tensor) -> Tensor:
        """x^T g: W_enc's gradient."""
        return x.t() @ g


DENSE = DenseProducts()


class BlockProducts(DenseProducts):
    """The same products over a CLT's weight blocks: latents of layer l read x's layer-l columns and write y's
    columns of layer l and, with cross_layer, of every later layer (else layer l alone: per-layer transcoders side
    by side)."""

    def __init__(self, layers: int, cross_layer: bool):
        self.layers, self.cross_layer = layers, cross_layer

    def _widths(self, W: Tensor) -> tuple[int, int]:
        return W.shape[0] // self.layers, W.shape[1] // self.layers

    def writers(self, layer: int, F: int) -> slice:
        """The latents that write output layer `layer`: its own, and with cross_layer every earlier layer's."""
        return slice(0 if self.cross_layer else layer * F, (layer + 1) * F)

    def written(self, layer: int, d: int) -> slice:
        """The output columns latents of layer `layer` write."""
        return slice(layer * d, self.layers * d if self.cross_layer else (layer + 1) * d)

    def encode(self, x: Tensor, W_enc: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        d, F = self._widths(W_enc)
        out = x.new_empty(x.shape[0], W_enc.shape[1]) if out is None else out
        for layer in range(self.layers):
            rows, cols = slice(layer * d, (layer + 1) * d), slice(layer * F, (layer + 1) * F)
            super().encode(x[:, rows], W_enc[rows, cols], None if bias is None else bias[cols], out=out[:, cols])
        return out

    def decode(self, f: Tensor, W_dec: Tensor, bias: Tensor) -> Tensor:
        F, d = self._widths(W_dec)
        out = f.new_empty(f.shape[0], W_dec.shape[1])
        for layer in range(self.layers):
            latents, cols = self.writers(layer, F), slice(layer * d, (layer + 1) * d)
            torch.addmm(bias[cols], f[:, latents], W_dec[latents, cols], out=out[:, cols])
        return out

    def decode_t(self, g: Tensor, W_dec: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        F, d = self._widths(W_dec)
        out = g.new_empty(g.shape[0], W_dec.shape[0]) if out is None else out
        for layer in range(self.layers):
            latents, cols = slice(layer * F, (layer + 1) * F), self.written(layer, d)
            super().decode_t(g[:, cols], W_dec[latents, cols], None if bias is None else bias[latents],
                             out=out[:, latents])
        return out

    def decoder_grad(self, f: Tensor, g: Tensor) -> Tensor:
        F, d = f.shape[1] // self.layers, g.shape[1] // self.layers
        grad = f.new_zeros(f.shape[1], g.shape[1])
        for layer in range(self.layers):
            latents, cols = self.writers(layer, F), slice(layer * d, (layer + 1) * d)
            torch.mm(f[:, latents].t(), g[:, cols], out=grad[latents, cols])
        return grad

    def encoder_grad(self, x: Tensor, g: Tensor) -> Tensor:
        d, F = x.shape[1] // self.layers, g.shape[1] // self.layers
        grad = x.new_zeros(x.shape[1], g.shape[1])
        for layer in range(self.layers):
            rows, cols = slice(layer * d, (layer + 1) * d), slice(layer * F, (layer + 1) * F)
            torch.mm(x[:, rows].t(), g[:, cols], out=grad[rows, cols])
        return grad
