"""A synthetic world of layers (`data.synthetic.layers` > 0): ground truth for cross-layer transcoders.

The features fire as in SyntheticWorld (data/synthetic.py). Each feature i enters the residual stream at a home
layer h_i (spread evenly) and stays there, in its direction e_i; an MLP at layer l writes the features it
computes, each in a direction d_i^l of its own. A feature is local (written by layer h_i's MLP alone) or, with
probability `cross_layer_fraction`, cross-layer (written by the MLPs of h_i and every later layer). So

    in_l  = sum_{i: h_i <= l} c_i e_i + noise                        (the MLP's input at layer l)
    out_l = sum_{i: h_i <= l, l in W_i} c_i d_i^l + noise              (its output; W_i: the layers i writes)

A CLT can recover a cross-layer feature as one latent that reads in_{h_i} and writes every l in W_i; per-layer
transcoders need one latent per written layer (each reads it again from in_l, where it still is). The joint
truth a CLT's decoder rows recover is each feature's writes side by side (d_i^l at l in W_i, zero elsewhere),
normalised: `dictionary` [N, L d]; `writes` [N, L] and `output_dictionary` [L, N, d] score the latents per feature
(metrics/layers.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelab.data.synthetic import SyntheticSpec, SyntheticWorld


def layer_site_names(layers: int) -> tuple[list[str], list[str]]:
    """(reads, writes): the pseudo-hooks in_0 .. in_{L-1} (MLP inputs) and out_0 .. out_{L-1} (MLP outputs)."""
    return [f"in_{layer}" for layer in range(layers)], [f"out_{layer}" for layer in range(layers)]


class LayeredWorld(SyntheticWorld):
    """SyntheticWorld whose samples are [n, 2 L d]: in_0 .. in_{L-1}, then out_0 .. out_{L-1}, side by side."""

    def __init__(self, spec: SyntheticSpec):
        super().__init__(spec)
        n, d, layers = spec.n_features, spec.d_in, spec.layers
        g = torch.Generator().manual_seed(spec.world_seed + 11)
        self.home = torch.empty(n, dtype=torch.long)
        self.home[torch.randperm(n, generator=g)] = torch.arange(n) % layers
        self.cross = torch.rand(n, generator=g) < spec.cross_layer_fraction
        layer = torch.arange(layers)
        self.present = layer >= self.home[:, None]  # [N, L]: in the residual stream at layer l
        self.writes = self.present & (self.cross[:, None] | (layer == self.home[:, None]))  # [N, L]
        out = torch.randn(layers, n, d, generator=g)
        self.output_dictionary = out / out.norm(dim=-1, keepdim=True)  # [L, N, d]
        self.input_dictionary = self.dictionary  # [N, d]: e_i
        joint = (self.writes.T.unsqueeze(-1) * self.output_dictionary).transpose(0, 1).reshape(n, layers * d)
        self.dictionary = joint / joint.norm(dim=1, keepdim=True)  # [N, L d]: what a CLT's decoder rows recover
        reads, writes = layer_site_names(layers)
        self.site_names = reads + writes

    def mix(self, coefficients: Tensor, generator: torch.Generator) -> Tensor:
        """[n, 2 L d]: every layer's MLP input, then every layer's MLP output."""
        spec = self.spec
        parts = [(coefficients * self.present[:, layer]) @ self.input_dictionary for layer in range(spec.layers)]
        parts += [(coefficients * self.writes[:, layer]) @ self.output_dictionary[layer]
                  for layer in range(spec.layers)]
        x = torch.cat(parts, dim=1)
        x += spec.noise_std * torch.randn(x.shape, generator=generator) / math.sqrt(spec.d_in)
        return x

    def tensors(self) -> dict[str, Tensor]:
        return super().tensors() | {"home": self.home.contiguous(), "writes": self.writes.contiguous(),
                                    "input_dictionary": self.input_dictionary.contiguous(),
                                    "output_dictionary": self.output_dictionary.contiguous()}
