"""Export to SAELens's on-disk format: `cfg.json` + `sae_weights.safetensors`, normalisation folded in.

The exported SAE takes raw activations: with scale C, b_dec' = C b_dec, b_enc' = C b_enc, thresholds'
= C theta (SPEC section 0), so export(sae)(x_raw) == C * sae(x_raw / C). A transcoder with input scale C and
target scale C_t is exported so that export(tc)(x_raw) == C_t * tc(x_raw / C) (SAE.exported_tensors).
`load_exported` rebuilds an inference-only module from those files with SAELens's forward semantics: the
encoder is the one the variant owning the cfg.json architecture declares (saelens_layout.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.io import atomic_write, write_json
from saelab.saes.base import SAE
from saelab.saes.saelens_layout import SAELensLayout, find_layout, known_architectures

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"


def export_sae(sae: SAE, scale: float, out_dir: Path, metadata: Mapping[str, Any],
               target_scale: float | None = None, site_scales: Sequence[float] | None = None) -> Path:
    """Write the SAE for raw activations x_raw = scale * x (a transcoder's raw targets: target_scale * t; a
    crosscoder's sites: C_s * x^s, side by side, with `metadata["hook_names"]` naming them)."""
    out_dir = Path(out_dir)
    exported = sae.exported_tensors(float(scale), target_scale, site_scales)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in exported.items()}
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    folded = {"normalization_scale_folded": float(scale)}
    if sae.transcoder:
        folded["target_normalization_scale_folded"] = float(target_scale if target_scale is not None else scale)
    if site_scales is not None:
        folded["site_normalization_scales_folded"] = [float(c) for c in site_scales]
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
    """Inference-only SAE rebuilt from an export, following SAELens's forward for its architecture."""

    def __init__(self, cfg: dict[str, Any], tensors: dict[str, Tensor]):
        super().__init__()
        self.cfg = cfg
        self.layout = layout_of(cfg)
        for name, value in tensors.items():
            self.register_buffer(name, value)

    def encode(self, x: Tensor) -> Tensor:
        """The layout's encoder on x, centred first where apply_b_dec_to_input says (as SAELens does)."""
        x_c = x - self.b_dec if self.cfg.get("apply_b_dec_to_input", True) else x
        return self.layout.encode(dict(self.named_buffers()), self.cfg, x_c)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def output(self, x: Tensor, f: Tensor) -> Tensor:
        """The output for input x with latents f: decode(f), plus a skip-transcoder's affine path W_skip x."""
        out = self.decode(f)
        return out + x @ self.W_skip.T if hasattr(self, "W_skip") else out

    def forward(self, x: Tensor) -> Tensor:
        return self.output(x, self.encode(x))


def layout_of(cfg: Mapping[str, Any], field: str = "architecture") -> SAELensLayout:
    """The layout of an export's cfg.json architecture (ConfigError on `field` if no variant declares it)."""
    architecture = str(cfg.get("architecture", "standard"))
    layout = find_layout(architecture)
    if layout is None:
        raise ConfigError(field, architecture, "a layout whose encoder is one of " + ", ".join(known_architectures())
                          + " (an SAE, or a transcoder: transcoder, skip_transcoder, jumprelu_transcoder, ...)")
    return layout


def read_config(path: Path, field: str = "sae_dir") -> dict[str, Any]:
    """An export's cfg.json (ConfigError on `field`, naming the file, unless it is a JSON object with d_in, d_sae
    and architecture)."""
    file = Path(path) / CONFIG_FILE
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(field, str(file), f"a readable SAELens cfg.json ({type(err).__name__})") from None
    if not isinstance(cfg, dict) or any(key not in cfg for key in ("d_in", "d_sae", "architecture")):
        raise ConfigError(field, str(file), "a SAELens cfg.json with d_in, d_sae and architecture")
    return cfg


def read_sae_dir(path: Path, field: str = "sae_dir") -> dict[str, Any]:
    """The cfg.json of a directory holding an SAE in SAELens's format (both files checked before anything loads)."""
    directory = Path(path).expanduser()
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ConfigError(field, str(path), f"a directory holding {CONFIG_FILE} and {WEIGHTS_FILE} (SAELens's "
                          "format; a saelab run's is <run dir>/sae)")
    cfg = read_config(directory, field)
    check_weights_file(directory, field)
    return cfg


def check_weights_file(path: Path, field: str = "sae_dir") -> None:
    """An export's weights file must be whole and finite. Its header is parsed (it says how long the file must
    be, so a truncated or damaged file fails here), then each tensor is read in turn and a NaN or inf refused by
    name: everything that loads an export (saelab-eval, init_from, the dashboard) checks it here, before any
    model loads, instead of measuring `fvu: nan` or training from it."""
    file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118  (safe_open is not iterable)
                check_finite(field, file, name, weights.get_tensor(name))
    except (OSError, SafetensorError) as err:
        raise ConfigError(field, str(file), f"a readable safetensors file ({err})") from None


def check_finite(field: str, file: Path, name: str, tensor: Tensor) -> None:
    """A ConfigError naming the tensor of `file` that holds NaN or inf values, and how many."""
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ConfigError(field, str(file), f"finite weights ({name} holds {bad} NaN/inf values)")


def load_exported(path: Path) -> ExportedSAE:
    path = Path(path)
    return ExportedSAE(read_config(path), load_file(str(path / WEIGHTS_FILE)))


def import_sae(sae: SAE, path: Path, scale: float, target_scale: float | None = None,
               site_scales: Sequence[float] | None = None) -> None:
    """init_from: set `sae`'s parameters from an export so that, on activations normalised by `scale` (a
    transcoder's targets by `target_scale`, a crosscoder's sites by `site_scales`), it computes exactly what the
    export computes on raw ones."""
    check_importable(sae, path)
    sae.import_tensors(load_file(str(Path(path) / WEIGHTS_FILE)), scale, target_scale, site_scales)


def check_importable(sae: SAE, path: Path) -> None:
    """init_from's export must have this SAE's layout and sizes (checked from cfg.json, before any heavy work)."""
    cfg = read_config(path)
    check_weights_file(path, "init_from")
    expected = sae.exported_config()["architecture"]
    sizes = {"d_in": sae.d_in, "d_sae": sae.d_sae, **({"d_out": sae.d_out} if sae.transcoder else {})}
    found = {"architecture": cfg.get("architecture", "standard"), **{k: cfg.get(k) for k in sizes}}
    if found != {"architecture": expected, **sizes}:
        raise ConfigError("init_from", str(path), f"an SAE the sae config describes ({expected}, "
                          + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "); this one: "
                          + ", ".join(f"{k} {v}" for k, v in found.items()))
