"""Export to SAELens's on-disk format: `cfg.json` + `sae_weights.safetensors`, normalisation folded in.

The exported SAE takes raw activations: with scale C, b_dec' = C b_dec, b_enc' = C b_enc, thresholds'
= C theta (SPEC section 0), so export(sae)(x_raw) == C * sae(x_raw / C). A transcoder with input scale C and
target scale C_t is exported so that export(tc)(x_raw) == C_t * tc(x_raw / C) (SAE.exported_tensors).
`load_exported` rebuilds an inference-only module from those files with SAELens's forward semantics.
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


def export_sae(sae: SAE, scale: float, out_dir: Path, metadata: Mapping[str, Any],
               target_scale: float | None = None) -> Path:
    """Write the SAE for raw activations x_raw = scale * x (a transcoder's raw targets: target_scale * t)."""
    out_dir = Path(out_dir)
    exported = sae.exported_tensors(float(scale), target_scale)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in exported.items()}
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    folded = {"normalization_scale_folded": float(scale)}
    if sae.transcoder:
        folded["target_normalization_scale_folded"] = float(target_scale if target_scale is not None else scale)
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.centres_input,
        "normalize_activations": "none",  # the scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {**folded, **dict(metadata)},
        **sae.exported_config(),
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
        arch = base_architecture(self.cfg["architecture"])
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
        out = self.decode(self.encode(x))
        return out + x @ self.W_skip.T if hasattr(self, "W_skip") else out  # a skip-transcoder's affine path


def base_architecture(architecture: str) -> str:
    """The SAE architecture whose encoder a transcoder layout uses: transcoder and skip_transcoder -> standard,
    jumprelu_(skip_)transcoder -> jumprelu, saelab_<arch>(_skip)_transcoder -> <arch> (an SAE: itself)."""
    known = {"transcoder": "standard", "skip_transcoder": "standard", "jumprelu_transcoder": "jumprelu",
             "jumprelu_skip_transcoder": "jumprelu"}
    if architecture in known:
        return known[architecture]
    if architecture.startswith("saelab_") and architecture.endswith("_transcoder"):
        base = architecture.removeprefix("saelab_").removesuffix("_transcoder").removesuffix("_skip")
        return base if base in ("topk", "gated") else f"saelab_{base}"
    return architecture


def load_exported(path: Path) -> ExportedSAE:
    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    return ExportedSAE(cfg, load_file(str(path / WEIGHTS_FILE)))
