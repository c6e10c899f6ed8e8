"""Write small random cross-layer transcoders (CLTs) in circuit-tracer 0.5.0's on-disk format, with inputs and the
outputs a plain-torch reference of its maths gives (written from the spec in scripts/circuit_tracer_compat/FORMAT.md,
independently of circuit-tracer), for check_clt.py to compare against circuit_tracer's load_clt.

Usage (plain torch + safetensors, e.g. saelab's venv):  .venv/bin/python make_clt_fixture.py OUT_DIR
writes OUT_DIR/{jumprelu,relu}/, each a load_clt directory plus inputs/expected:
  W_enc_{i}.safetensors  W_enc_{i} [d_transcoder, d_model], b_enc_{i} [d_transcoder], b_dec_{i} [d_model]
                         (the bias of OUTPUT layer i), threshold_{i} [d_transcoder] (JumpReLU only; its absence = ReLU)
  W_dec_{i}.safetensors  W_dec_{i} [d_transcoder, n_layers - i, d_model]: W_dec_{i}[:, j] writes to output layer i + j
  config.yaml            what a Hugging Face CLT repo carries beside them (model_kind, hooks); load_clt ignores it
  inputs.safetensors     x [n_layers, n_pos, d_model]: the input at every layer (feature_input_hook, per layer)
  expected.safetensors   pre [n_layers, n_pos, d_transcoder], latents (same shape), out [n_layers, n_pos, d_model]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

N_LAYERS, D_MODEL, D_TRANSCODER, N_POS = 3, 8, 5, 4
CONFIG = "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"


def reference(x: torch.Tensor, w_enc: list[torch.Tensor], b_enc: list[torch.Tensor], b_dec: list[torch.Tensor],
              w_dec: list[torch.Tensor], threshold: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """pre[l] = x[l] @ W_enc_l.T + b_enc_l; latents = relu(pre), or pre * (pre > threshold_l) for JumpReLU;
    out[m] = b_dec_m + sum over source layers l <= m of latents[l] @ W_dec_l[:, m - l]."""
    n_layers = len(w_enc)
    pre = torch.stack([x[layer] @ w_enc[layer].T + b_enc[layer] for layer in range(n_layers)])
    if threshold is None:
        latents = pre.clamp(min=0)
    else:
        latents = torch.stack([pre[layer] * (pre[layer] > threshold[layer]) for layer in range(n_layers)])
    out = torch.stack([b_dec[m] + sum((latents[src] @ w_dec[src][:, m - src] for src in range(m + 1)),
                                      torch.zeros(x.shape[1], x.shape[2], dtype=x.dtype))
                       for m in range(n_layers)])
    return {"pre": pre, "latents": latents, "out": out}


def write_clt(out: Path, jumprelu: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    w_enc = [randn(D_TRANSCODER, D_MODEL, scale=0.5) for _ in range(N_LAYERS)]
    b_enc = [randn(D_TRANSCODER, scale=0.1) for _ in range(N_LAYERS)]
    b_dec = [randn(D_MODEL, scale=0.1) for _ in range(N_LAYERS)]
    w_dec = [randn(D_TRANSCODER, N_LAYERS - i, D_MODEL, scale=0.5) for i in range(N_LAYERS)]
    threshold = [torch.rand(D_TRANSCODER, generator=g) * 0.5 for _ in range(N_LAYERS)] if jumprelu else None
    x = randn(N_LAYERS, N_POS, D_MODEL)
    expected = reference(x, w_enc, b_enc, b_dec, w_dec, threshold)
    latents = expected["latents"]
    # Some latents zeroed and some kept; the last position active somewhere (circuit-tracer's decode sizes its
    # output by the last position that has an active latent).
    assert 0 < int((latents > 0).sum()) < latents.numel() and bool((latents[:, -1] > 0).any())
    if jumprelu:
        assert bool(((expected["pre"] > 0) & (latents == 0)).any()), "no latent in (0, threshold]"

    out.mkdir(parents=True, exist_ok=True)
    for i in range(N_LAYERS):
        enc = {f"W_enc_{i}": w_enc[i], f"b_enc_{i}": b_enc[i], f"b_dec_{i}": b_dec[i]}
        if threshold is not None:
            enc[f"threshold_{i}"] = threshold[i]
        save_file(enc, str(out / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": w_dec[i].contiguous()}, str(out / f"W_dec_{i}.safetensors"))
    (out / "config.yaml").write_text(CONFIG)
    save_file({"x": x}, str(out / "inputs.safetensors"))
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))


def main() -> None:
    root = Path(sys.argv[1])
    write_clt(root / "jumprelu", jumprelu=True, seed=0)
    write_clt(root / "relu", jumprelu=False, seed=1)
    print(f"wrote {root}/jumprelu and {root}/relu")


if __name__ == "__main__":
    main()
