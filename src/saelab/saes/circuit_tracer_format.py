"""A cross-layer transcoder written in circuit-tracer's format (0.5.0: circuit_tracer.transcoder.
cross_layer_transcoder.load_clt; scripts/circuit_tracer_compat/FORMAT.md), beside saelab's own export.

From the SAELens-layout tensors (normalisation folded in, raw activations in and out: SAELensTensors), with L
layers of F latents over d-wide sites, for each layer i:

    W_enc_{i}.safetensors: W_enc_i [F, d] (the diagonal block, transposed: circuit-tracer's rows are features),
                           b_enc_i [F], b_dec_i [d] (the bias of output layer i), threshold_i [F] (JumpReLU only);
    W_dec_{i}.safetensors: W_dec_i [F, L - i, d]: W_dec_i[:, j] writes output layer i + j.

circuit-tracer's encoder is ReLU, or JumpReLU pre * (pre > threshold) when threshold_0 is present: exactly a ReLU
transcoder's, a JumpReLU's, and BatchTopK's at inference (its scalar threshold, per latent). A TopK selection, an
untied Gated encoder and a skip connection (which load_clt ignores) have no place in it: `refusal` says why.
config.yaml (circuit-tracer's Hugging Face convention) names the hooks when the sites are blocks.0..L-1 of one
hook each, as circuit-tracer's replacement model reads layers 0..L-1.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file
from torch import Tensor

WRITABLE = frozenset({"transcoder", "jumprelu_transcoder"})  # the SAELens architectures it can hold: ReLU, JumpReLU


def refusal(architecture: str) -> str | None:
    """Why a CLT of this SAELens architecture cannot be written in circuit-tracer's format (None: it can)."""
    if architecture in WRITABLE:
        return None
    if "skip" in architecture:
        return "circuit-tracer's load_clt ignores a skip connection (train with sae.skip=false)"
    return (f"circuit-tracer's CLT encoder is ReLU or JumpReLU; the {architecture} architecture is not (a TopK "
            "selection or an untied Gated encoder)")


def layer_tensors(tensors: Mapping[str, Tensor], layers: int) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """[(W_enc_{i} file's tensors, W_dec_{i} file's)] for i = 0..L-1, from the SAELens-layout tensors."""
    W_enc, W_dec = tensors["W_enc"].float(), tensors["W_dec"].float()
    d, F = W_enc.shape[0] // layers, W_enc.shape[1] // layers
    files = []
    for i in range(layers):
        enc = {f"W_enc_{i}": W_enc[i * d:(i + 1) * d, i * F:(i + 1) * F].t(),
               f"b_enc_{i}": tensors["b_enc"][i * F:(i + 1) * F].float(),
               f"b_dec_{i}": tensors["b_dec"][i * d:(i + 1) * d].float()}
        if "threshold" in tensors:
            threshold = tensors["threshold"].float().expand(W_enc.shape[1])  # BatchTopK's is one scalar
            enc[f"threshold_{i}"] = threshold[i * F:(i + 1) * F]
        dec = {f"W_dec_{i}": W_dec[i * F:(i + 1) * F, i * d:].reshape(F, layers - i, d)}
        files.append(({k: v.contiguous() for k, v in enc.items()}, {k: v.contiguous() for k, v in dec.items()}))
    return files


def hook_config(reads: Sequence[str], writes: Sequence[str], model_name: str) -> dict[str, Any] | None:
    """circuit-tracer's config.yaml for sites blocks.0..L-1.<input hook> -> blocks.0..L-1.<output hook>, else None."""
    def suffix(sites: Sequence[str]) -> str | None:
        found = [re.fullmatch(r"blocks\.(\d+)\.(.+)", site) for site in sites]
        if not all(found) or [int(m.group(1)) for m in found] != list(range(len(sites))):
            return None
        names = {m.group(2) for m in found}
        return names.pop() if len(names) == 1 else None

    read, write = suffix(reads), suffix(writes)
    if read is None or write is None:
        return None
    return {"model_kind": "cross_layer_transcoder", "model_name": model_name, "feature_input_hook": read,
            "feature_output_hook": write}


def export_circuit_tracer(tensors: Mapping[str, Tensor], layers: int, out_dir: Path, reads: Sequence[str],
                          writes: Sequence[str], model_name: str) -> None:
    """Write the directory (the caller checked `refusal`): into a temporary sibling, renamed into place when whole,
    so an interrupted export leaves nothing that looks finished."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        for i, (enc, dec) in enumerate(layer_tensors(tensors, layers)):
            save_file(enc, str(tmp / f"W_enc_{i}.safetensors"))
            save_file(dec, str(tmp / f"W_dec_{i}.safetensors"))
        config = hook_config(reads, writes, model_name)
        if config is not None:
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
