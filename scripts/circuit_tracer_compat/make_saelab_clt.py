"""Write saelab cross-layer transcoders in circuit-tracer's format, with the inputs and saelab's own outputs.

Usage (saelab's venv):  .venv/bin/python scripts/circuit_tracer_compat/make_saelab_clt.py OUT_DIR
For each of OUT_DIR/{jumprelu,relu}: a 3-layer CLT built as saelab-train builds one (build_sae over sites
blocks.{l}.hook_resid_mid -> blocks.{l}.hook_mlp_out), with random weights kept to the CLT's block shape and a
normalisation scale per site, exported as a run exports it (SAELensTensors.exported_tensors, then
saes/circuit_tracer_format.py); inputs.safetensors holds raw inputs x [L, n_pos, d]; expected.safetensors holds
what saelab's SAE module computes on them (pre-activations, latents, outputs, in raw units), which check_clt.py
compares with circuit-tracer's load_clt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from saelab.saes.base import build_sae
from saelab.saes.circuit_tracer_format import export_circuit_tracer
from saelab.sites import column_scales

LAYERS, D, F, N_POS = 3, 16, 24, 7
VARIANTS = {"jumprelu": {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "sparsity": "tanh",
                         "decoder_constraint": "none"},
            "relu": {"_target_": "saelab.saes.relu.ReluSAE"}}


def make(variant: str, out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    sae = build_sae({**VARIANTS[variant], "d_in": D, "d_out": D, "sites": LAYERS, "d_sae": LAYERS * F})
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        sae.layer_structure.apply(sae)  # keep the CLT's zero blocks after the noise
        if variant == "jumprelu":
            sae.raw_threshold.copy_(0.2 + 0.3 * torch.rand_like(sae.raw_threshold))
    reads = [f"blocks.{i}.hook_resid_mid" for i in range(LAYERS)]
    writes = [f"blocks.{i}.hook_mlp_out" for i in range(LAYERS)]
    site_scales = (1 + 4 * torch.rand(2 * LAYERS)).tolist()  # each site its own normalisation scale
    scale = site_scales[0]
    export_circuit_tracer(sae.exported_tensors(scale, None, site_scales), LAYERS, out, reads, writes, "fixture")
    in_scale, out_scale = column_scales(site_scales[:LAYERS], D), column_scales(site_scales[LAYERS:], D)
    x = torch.randn(LAYERS, N_POS, D) * torch.tensor(site_scales[:LAYERS])[:, None, None]
    flat = x.transpose(0, 1).reshape(N_POS, LAYERS * D) / in_scale  # saelab's input: the sites side by side
    sae.eval()
    with torch.no_grad():
        pre = sae.encoder_preacts(flat, sae.W_enc, sae.b_enc) * scale  # latents carry the first site's scale
        latents = sae.encode(flat) * scale
        outputs = sae(flat) * out_scale
    per_layer = lambda t: t.reshape(N_POS, LAYERS, -1).transpose(0, 1).contiguous()  # noqa: E731
    save_file({"x": x.contiguous()}, str(out / "inputs.safetensors"))
    save_file({"pre": per_layer(pre), "latents": per_layer(latents), "out": per_layer(outputs)},
              str(out / "expected.safetensors"))


def main() -> None:
    root = Path(sys.argv[1])
    for seed, variant in enumerate(VARIANTS):
        make(variant, root / variant, seed)
    print(f"saelab CLTs written to {root}")


if __name__ == "__main__":
    main()
