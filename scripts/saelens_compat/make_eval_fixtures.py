"""Make the SAELens-saved SAEs that tests/test_eval.py evaluates with `saelab-eval`: saved by SAELens itself
(`SAE.save_model`), with SAELens's own encode and forward on fixed inputs kept beside them (expected.safetensors).

Run once, with a Python that has sae-lens installed (never saelab's environment), from the project root:
    $SAELENS_VENV/bin/python scripts/saelens_compat/make_eval_fixtures.py tests/fixtures/saelens
The SAEs fit the tests' tiny GPT-2 (d_model 32): a standard SAE and a JumpReLU SAE on blocks.0.hook_out and a
skip-transcoder from blocks.0.mlp.hook_in to blocks.0.mlp.hook_out, with random weights and biases.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    __version__,
)
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file

D_MODEL, D_SAE = 32, 64


def metadata(**fields) -> SAEMetadata:
    return SAEMetadata(model_name="tiny", context_size=32, prepend_bos=True, **fields)


def build() -> dict[str, torch.nn.Module]:
    hook = "blocks.0.hook_out"
    return {
        "standard": StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=metadata(hook_name=hook))),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=metadata(hook_name=hook))),
        "skip_transcoder": SkipTranscoder(SkipTranscoderConfig(
            d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, apply_b_dec_to_input=False,
            metadata=metadata(hook_name="blocks.0.mlp.hook_in", hook_name_out="blocks.0.mlp.hook_out"))),
    }


def main(root: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(64, D_MODEL, generator=generator)
    for name, sae in build().items():
        with torch.no_grad():
            for param_name, param in sae.named_parameters():
                scale = 0.3 if param_name.startswith("W_") else 0.5
                param.copy_(scale * torch.randn(param.shape, generator=generator))
                if param_name == "threshold":
                    param.abs_()
            sae.eval()
            expected = {"x": x, "latents": sae.encode(x), "output": sae(x)}
        sae.save_model(root / name)
        save_file({k: v.contiguous() for k, v in expected.items()}, str(root / name / "expected.safetensors"))
        print(f"{name}: saved by sae-lens {__version__} in {root / name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
