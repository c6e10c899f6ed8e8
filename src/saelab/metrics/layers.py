"""How a transcoder over several layers recovers the features of a LayeredWorld (data/synthetic_layers.py).

A feature i writes the MLP outputs of the layers W_i (its home layer; a cross-layer feature every later one too),
in a direction d_i^l at each. A latent recovers the write (i, l) when its decoder block at layer l is the best match
of d_i^l among all latents and |cos| > 0.9. A CLT can recover a cross-layer feature with one latent writing every
layer of W_i; per-layer transcoders need |W_i| latents, one per layer (Ameisen et al. 2025's argument for CLTs).

- layer_writes_recovered: the fraction of all writes (i, l) recovered;
- cross_features_recovered: the fraction of cross-layer features (|W_i| > 1) with every write recovered;
- latents_per_cross_feature: over those, the mean number of distinct latents their writes' matches are (1 is one
  latent per feature; their mean |W_i| is cross_feature_span, what one latent per layer needs).
"""

from __future__ import annotations

import torch
from torch import Tensor

MATCHED = 0.9  # |cos| above which a latent's decoder block recovers a write


def layer_recovery(W_dec: Tensor, writes: Tensor, output_dictionary: Tensor) -> dict[str, float]:
    """The metrics above for a decoder `W_dec` [d_sae, L d] in raw units, against a world's `writes` [N, L] (bool)
    and `output_dictionary` [L, N, d] (unit rows)."""
    layers = writes.shape[1]
    blocks = W_dec.detach().double().view(W_dec.shape[0], layers, -1)
    blocks = blocks / blocks.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best, latent = [], []
    for layer in range(layers):
        cos = (blocks[:, layer] @ output_dictionary[layer].double().T).abs()  # [d_sae, N]
        value, ids = cos.max(dim=0)
        best.append(value)
        latent.append(ids)
    best_cos, best_latent = torch.stack(best, 1), torch.stack(latent, 1)  # [N, L]
    recovered = writes & (best_cos > MATCHED)
    cross = writes.sum(1) > 1
    complete = cross & (recovered == writes).all(1)
    distinct = [len(set(best_latent[i][writes[i]].tolist())) for i in complete.nonzero().flatten().tolist()]
    return {
        "layer_writes_recovered": float(recovered.sum() / writes.sum().clamp_min(1)),
        "cross_features_recovered": float(complete.sum() / cross.sum()) if cross.any() else float("nan"),
        "latents_per_cross_feature": sum(distinct) / len(distinct) if distinct else float("nan"),
        "cross_feature_span": float(writes[complete].sum() / complete.sum()) if complete.any() else float("nan"),
    }
