"""Check make_clt_fixture.py's CLTs load in circuit-tracer 0.5.0 and give the reference's latents and outputs.

Usage (in the circuit-tracer venv, scripts/circuit_tracer_compat/venv.sh):  $VENV/bin/python check_clt.py FIXTURE_DIR
For each FIXTURE_DIR/{jumprelu,relu}: load_clt on CPU in float32 (eager, and with lazy encoder/decoder reads from
disk), then encode, encode_layer, decode and forward against expected.safetensors (atol 1e-5); also the directory
through load_transcoders (the config.yaml path Hugging Face repos take, with snapshot_download pointed at it).
Prints one OK line per checked quantity, exits 1 on any mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from circuit_tracer.utils import hf_utils
from safetensors.torch import load_file

ATOL = 1e-5
CPU = torch.device("cpu")
failures: list[str] = []


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.to_dense() if got.is_sparse else got
    if got.shape == want.shape and torch.allclose(got.float(), want, atol=ATOL, rtol=0):
        print(f"OK {name} {tuple(got.shape)}")
    else:
        diff = (got.float() - want).abs().max().item() if got.shape == want.shape else "shape"
        failures.append(f"{name}: got {tuple(got.shape)}, want {tuple(want.shape)}, max diff {diff}")
        print(f"FAIL {failures[-1]}")


def check_clt(tag: str, clt: CrossLayerTranscoder, jumprelu: bool, x: torch.Tensor,
              want: dict[str, torch.Tensor]) -> None:
    n_layers, n_pos, d_model = x.shape
    layout = (clt.n_layers, clt.d_model, clt.d_transcoder, clt.dtype, clt.skip_connection,
              isinstance(clt.activation_function, JumpReLU))
    wanted = (n_layers, d_model, want["latents"].shape[-1], torch.float32, False, jumprelu)
    if layout == wanted:
        print(f"OK {tag} layout (n_layers, d_model, d_transcoder, dtype, skip, jumprelu) = {layout}")
    else:
        failures.append(f"{tag} layout {layout} != {wanted}")
        print(f"FAIL {failures[-1]}")
    with torch.no_grad():
        check(f"{tag} encode", clt.encode(x), want["latents"])
        layers = range(n_layers)
        check(f"{tag} encode_layer(x[l], l, apply_activation_function=False) for every l",
              torch.stack([clt.encode_layer(x[i], i, apply_activation_function=False) for i in layers]), want["pre"])
        check(f"{tag} encode_layer(x[l], l) for every l",
              torch.stack([clt.encode_layer(x[i], i) for i in layers]), want["latents"])
        check(f"{tag} decode", clt.decode(want["latents"]), want["out"])
        check(f"{tag} forward", clt.forward(x), want["out"])


def main() -> None:
    root = Path(sys.argv[1])
    for variant in ("jumprelu", "relu"):
        d = root / variant
        x = load_file(str(d / "inputs.safetensors"))["x"]
        want = load_file(str(d / "expected.safetensors"))
        for lazy_encoder, lazy_decoder in ((False, False), (False, True), (True, True)):
            clt = load_clt(str(d), device=CPU, dtype=torch.float32, lazy_encoder=lazy_encoder,
                           lazy_decoder=lazy_decoder)
            check_clt(f"{variant} load_clt(lazy_encoder={lazy_encoder}, lazy_decoder={lazy_decoder})", clt,
                      variant == "jumprelu", x, want)

        # The Hugging Face path: config.yaml + snapshot_download of *.safetensors (here: the directory itself).
        config: dict[str, Any] = yaml.safe_load((d / "config.yaml").read_text())
        config.update(repo_id="local/fixture", revision=None, subfolder=None, scan="local/fixture")
        original = hf_utils.snapshot_download
        hf_utils.snapshot_download = lambda *args, _d=str(d), **kwargs: _d  # type: ignore[assignment]
        try:
            clt = hf_utils.load_transcoders(config, device=CPU, dtype=torch.float32)
        finally:
            hf_utils.snapshot_download = original
        assert isinstance(clt, CrossLayerTranscoder)
        hooks = (clt.feature_input_hook, clt.feature_output_hook, clt.scan)
        assert hooks == ("hook_resid_mid", "hook_mlp_out", "local/fixture"), hooks
        check_clt(f"{variant} load_transcoders(config.yaml)", clt, variant == "jumprelu", x, want)

        # Documented quirks (asserted so a circuit-tracer change shows up here).
        assert load_clt(str(d), device=CPU).dtype == torch.bfloat16  # load_clt's default dtype
        cut = want["latents"].clone()
        cut[:, -1] = 0
        n_pos = x.shape[1]
        assert clt.decode(cut).shape[1] == n_pos - 1, "decode no longer drops trailing inactive positions"
        print(f"OK {variant} quirks: default dtype bfloat16; decode drops trailing all-zero positions")

    if failures:
        print(f"{len(failures)} mismatches", file=sys.stderr)
        sys.exit(1)
    print("all OK")


if __name__ == "__main__":
    main()
