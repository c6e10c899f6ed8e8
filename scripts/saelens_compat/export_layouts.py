"""Export one SAE or transcoder of every saelab layout, with inputs and the outputs saelab computes for them.

Run with saelab's environment; `check_in_saelens.py` then loads each export with SAELens itself (see run.sh).
Every export takes raw activations: the normalisation scales (input 7.5, a transcoder's target 0.3) are folded in.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from saelab.saes import build_sae
from saelab.saes.saelens_format import export_sae

VARIANTS = {
    "relu": ("saelab.saes.relu.ReluSAE", {"sparsity_coefficient": 0.1}),
    "gated": ("saelab.saes.gated.GatedSAE", {"sparsity_coefficient": 0.1}),
    "jumprelu": ("saelab.saes.jumprelu.JumpReLUSAE", {"sparsity_coefficient": 0.1, "threshold_init": 0.05}),
    "topk": ("saelab.saes.topk.TopKSAE", {"k": 6}),
    "batchtopk": ("saelab.saes.batchtopk.BatchTopKSAE", {"k": 6}),
    "matryoshka_batchtopk": ("saelab.saes.matryoshka_batchtopk.MatryoshkaBatchTopKSAE", {"k": 6}),
}
KINDS = {"sae": {}, "transcoder": {"d_out": 24}, "skip_transcoder": {"d_out": 24, "skip": True}}
IN_SCALE, OUT_SCALE = 7.5, 0.3


def build(variant: str, kind: str):
    target, knobs = VARIANTS[variant]
    torch.manual_seed(0)
    sae = build_sae({"_target_": target, "d_in": 16, "d_sae": 64, "decoder_constraint": "none", **knobs,
                     **KINDS[kind]})
    with torch.no_grad():  # independent random parameters, so nothing holds by construction
        for name, p in sae.named_parameters():
            if name.startswith(("W_", "b_", "r_")):
                p.normal_(0, 0.3)
        if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.Tensor) and sae.threshold.dim() == 0:
            sae.threshold.fill_(0.2)  # BatchTopK's inference threshold
    return sae.eval()


def main(out_root: Path) -> None:
    x_raw = IN_SCALE * torch.randn(128, 16, generator=torch.Generator().manual_seed(1))
    for variant in VARIANTS:
        for kind in KINDS:
            sae = build(variant, kind)
            out_scale = OUT_SCALE if kind != "sae" else IN_SCALE
            directory = export_sae(sae, IN_SCALE, out_root / f"{variant}--{kind}", {"hook_name": "blocks.0.hook_in"},
                                   target_scale=out_scale if kind != "sae" else None)
            with torch.no_grad():
                latents = IN_SCALE * sae.encode(x_raw / IN_SCALE)
                output = out_scale * sae(x_raw / IN_SCALE)
            save_file({"x": x_raw, "latents": latents, "output": output}, str(directory / "expected.safetensors"))
            print(f"{directory.name}: {sae.exported_config()['architecture']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
