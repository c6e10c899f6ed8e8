"""A cross-layer transcoder's weights (Ameisen et al. 2025; SPEC section 7), kept to their shape in any variant.

Layers l = 0..L-1; layer l's latents f_l = act(W_enc^l x_l + b_enc^l) read its MLP input x_l alone, and the MLP
output of layer l is predicted from every layer at or before it: y_hat_l = sum_{l' <= l} W_dec^{l'->l} f_{l'} +
b_dec^l. Held as one SAE over the sites side by side (saelab.sites: reads x_0..x_{L-1}, writes y_0..y_{L-1}), its
weights are block matrices with the latents grouped by layer:

    W_enc [L d, L F]: block (l, l') is W_enc^l where l = l', zero elsewhere (each layer's latents read their layer);
    W_dec [L F, L d]: block (l', l) is W_dec^{l'->l} where l >= l', zero below (a latent writes its layer and later).

So every variant's activation and loss serve a CLT unchanged: the zero blocks are zero at the start and their
gradients are zeroed before each step (Adam's update of a parameter whose gradient has always been zero is zero).
A latent's decoder row is its decoders to all later layers, concatenated: the unit-norm constraint and the
norm-weighted penalties (tanh, ri_l1) use that norm, as Ameisen et al.'s tanh penalty does. With cross_layer false
the decoder is block-diagonal too: L per-layer transcoders trained side by side (the comparison they make).

An elementwise activation (ReLU, JumpReLU, Gated; BatchTopK's learned threshold at inference) makes the CLT causal:
layer l's output depends on x_0..x_l alone. TopK's per-token selection spans every layer's latents, so its
outputs also depend on later layers' inputs (the splice then reads a clean pass: run/evaluation.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from saelab.kernels.block_products import BlockProducts, LayerSpan

Keep = Callable[[int, int], bool]  # (row block, column block) -> whether the block is a weight


def same_layer(row: int, col: int) -> bool:
    return row == col


def this_and_later(row: int, col: int) -> bool:
    """A decoder block (latent layer l', output layer l) exists where l >= l'."""
    return col >= row


@torch.no_grad()
def zero_outside(W: Tensor, layers: int, keep: Keep) -> None:
    """Zero the blocks of W ([layers * r, layers * c]) that `keep` says are not weights."""
    blocks = W.view(layers, W.shape[0] // layers, layers, W.shape[1] // layers)
    for row in range(layers):
        for col in range(layers):
            if not keep(row, col):
                blocks[row, :, col, :].zero_()


class LayerStructure:
    """Which blocks of each weight matrix a CLT (or a side-by-side set of per-layer transcoders) has."""

    def __init__(self, layers: int, cross_layer: bool):
        self.layers, self.cross_layer = int(layers), bool(cross_layer)
        self.decoder_keep: Keep = this_and_later if cross_layer else same_layer
        self.products = BlockProducts(self.layers, self.cross_layer)  # the dense step's matmuls, blocks alone

    def spans(self, d_in: int, d_sae: int, d_out: int) -> tuple[LayerSpan, LayerSpan]:
        """(the encoder's, the decoder's) block structure as the sparse products' kernels skip it: latent j of
        layer l reads x's columns of layer l, and writes y's of layer l (and, in a CLT, every later one)."""
        group = d_sae // self.layers
        return (LayerSpan(group, d_in // self.layers, False),
                LayerSpan(group, d_out // self.layers, self.cross_layer))

    def masks(self, sae: nn.Module) -> list[tuple[Tensor, Keep]]:
        """(weight, its block pattern) for the weights that have one: the encoders (W_enc, a Gated SAE's W_mag)
        and the skip connection read their layer only; the decoder writes its pattern."""
        weights: list[tuple[Tensor, Keep]] = [(sae.W_dec, self.decoder_keep)]
        for name in ("W_enc", "W_mag", "W_skip"):
            weight = getattr(sae, name, None)
            if isinstance(weight, Tensor):
                weights.append((weight, same_layer))
        return weights

    @torch.no_grad()
    def apply(self, sae: nn.Module) -> None:
        """Zero the weights outside the pattern (at initialisation), keeping each decoder row's norm."""
        norms = sae.W_dec.norm(dim=1, keepdim=True)
        for weight, keep in self.masks(sae):
            zero_outside(weight, self.layers, keep)
        sae.W_dec.mul_(norms / sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def mask_gradients(self, sae: nn.Module) -> None:
        """Zero the gradients outside the pattern, before the optimiser step (zero blocks then stay zero)."""
        for weight, keep in self.masks(sae):
            if weight.grad is not None:
                zero_outside(weight.grad, self.layers, keep)
