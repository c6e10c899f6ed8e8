"""Load every export made by export_layouts.py with SAELens (SAE.load_from_disk) and compare its encode and
forward with what saelab computed. Run with a Python that has sae-lens installed (never saelab's environment:
sae-lens pins transformer-lens < 4). Exit status 1 if any layout SAELens has differs; saelab-named layouts
(saelab_*: no SAELens equivalent) are listed as such."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from sae_lens import SAE, __version__
from safetensors.torch import load_file


def main(root: Path) -> int:
    failures = 0
    print(f"sae-lens {__version__}")
    print(f"{'export':40s} {'architecture':28s} {'max |latents diff|':>19s} {'max |output diff|':>18s}  result")
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        architecture = json.loads((directory / "cfg.json").read_text())["architecture"]
        if architecture.startswith("saelab_"):
            print(f"{directory.name:40s} {architecture:28s} {'':>19s} {'':>18s}  no SAELens layout (saelab-named)")
            continue
        expected = load_file(str(directory / "expected.safetensors"))
        sae = SAE.load_from_disk(str(directory), device="cpu")
        with torch.no_grad():
            latents = sae.encode(expected["x"])
            output = sae(expected["x"])
        d_latents = float((latents - expected["latents"]).abs().max())
        d_output = float((output - expected["output"]).abs().max())
        scale = float(expected["output"].abs().max())
        ok = d_latents < 1e-4 * float(expected["latents"].abs().max()) + 1e-5 and d_output < 1e-4 * scale + 1e-5
        failures += not ok
        print(f"{directory.name:40s} {architecture:28s} {d_latents:19.2e} {d_output:18.2e}  "
              f"{'same' if ok else 'DIFFERENT'} ({type(sae).__name__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
