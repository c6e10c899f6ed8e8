"""Adding a variant is one Python file plus one YAML file, with no edits to saelab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

TOY_VARIANT = '''
"""A toy variant living outside saelab: a ReLU SAE with an L2 penalty on the latents."""
from dataclasses import dataclass

import torch
from torch import nn

from saelab.saes.base import SAE, SAEConfig, TrainStep, squared_error


@dataclass
class ToyConfig(SAEConfig):
    penalty_power: float = 2.0


class ToySAE(SAE):
    Config = ToyConfig
    saelens_architecture = "standard"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.init_decoder_and_tied_encoder())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))

    def encode(self, x):
        return torch.relu(self.centre(x) @ self.W_enc + self.b_enc)

    def training_loss(self, x, coefficients, target=None):
        f = self.encode(x)
        penalty = f.pow(self.cfg.penalty_power).sum(-1).mean()
        t = self.reconstruction_target(x, target)  # x for an SAE; a transcoder's target (less its skip path)
        terms = {"rec": squared_error(t, self.decode(f)), "toy_penalty": coefficients["sparsity"] * penalty}
        return TrainStep(terms, f)

    def export_tensors(self, scale):
        return {"W_enc": self.W_enc.detach(), "W_dec": self.W_dec.detach(),
                "b_enc": self.b_enc.detach() * scale, "b_dec": self.b_dec.detach() * scale}
'''

TOY_YAML = """
_target_: toy_variant.ToySAE
d_in: ${model.d_model}
expansion_factor: 2
d_sae: null
penalty_power: 2.0
sparsity_coefficient: 0.01
"""


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_a_variant_from_a_temp_module_trains_through_the_cli(transcoder, tiny_model_dir, tiny_corpus_dir, tmp_path):
    """...and, reconstructing `reconstruction_target`, is a transcoder too (model.target_hook), with no more code."""
    (tmp_path / "toy_variant.py").write_text(textwrap.dedent(TOY_VARIANT))
    (tmp_path / "conf" / "sae").mkdir(parents=True)
    (tmp_path / "conf" / "sae" / "toy.yaml").write_text(TOY_YAML)
    out = tmp_path / "outputs"
    args = [a for a in tiny_overrides(tiny_model_dir, tiny_corpus_dir, out) if not a.startswith("sae.")]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "saelab.cli.train", *args, "sae=toy", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
         "trainer.max_steps=1", "trainer.log_every_n_steps=1",
         *(["model.hook=blocks.0.mlp.hook_in", "model.target_hook=blocks.0.mlp.hook_out"] if transcoder else [])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = out.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["variant"] == "ToySAE" and metrics["steps"] == 1 and metrics["d_sae"] == 64
    assert metrics["architecture"] == ("transcoder" if transcoder else "standard")
    assert metrics.get("target_hook") == ("blocks.0.mlp.hook_out" if transcoder else None)
    csv_log = next(out.rglob("metrics.csv")).read_text()
    assert "loss/toy_penalty" in csv_log
