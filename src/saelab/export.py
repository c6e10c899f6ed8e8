"""Export to SAELens's on-disk format: `cfg.json` + `sae_weights.safetensors`, normalisation folded in.

The exported SAE takes raw activations: with scale C, b_dec' = C b_dec, b_enc' = C b_enc, thresholds'
= C theta (SPEC section 0), so export(sae)(x_raw) == C * sae(x_raw / C). `load_exported` rebuilds an
inference-only module from those files with SAELens's forward semantics, to check the export.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.io import atomic_write, write_json
from saelab.saes.base import SAE

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"


def export_sae(sae: SAE, scale: float, out_dir: Path, metadata: Mapping[str, Any]) -> Path:
    out_dir = Path(out_dir)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in sae.export_tensors(float(scale)).items()}
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input),
        "normalize_activations": "none",  # the scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {"normalization_scale_folded": float(scale), **dict(metadata)},
        **sae.export_config(),
    }
    write_json(out_dir / CONFIG_FILE, cfg)
    return out_dir


class ExportedSAE(nn.Module):
    """Inference-only SAE rebuilt from an export, following SAELens's forward for each architecture."""

    def __init__(self, cfg: dict[str, Any], tensors: dict[str, Tensor]):
        super().__init__()
        self.cfg = cfg
        for name, value in tensors.items():
            self.register_buffer(name, value)

    def encode(self, x: Tensor) -> Tensor:
        arch = self.cfg["architecture"]
        x_c = x - self.b_dec if self.cfg.get("apply_b_dec_to_input", True) else x
        if arch in ("gated", "saelab_gated_untied"):  # the untied ablation carries its own W_mag
            pi_gate = x_c @ self.W_enc + self.b_gate
            w_mag = self.W_mag if arch == "saelab_gated_untied" else self.W_enc * self.r_mag.exp()
            pi_mag = x_c @ w_mag + self.b_mag
            return (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)
        pre = x_c @ self.W_enc + self.b_enc
        if arch == "jumprelu":
            return pre * (pre > self.threshold).to(x.dtype)
        if arch == "topk":
            acts = torch.relu(pre)
            top = acts.topk(int(self.cfg["k"]), dim=-1)
            return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        return torch.relu(pre)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def load_exported(path: Path) -> ExportedSAE:
    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    return ExportedSAE(cfg, load_file(str(path / WEIGHTS_FILE)))
