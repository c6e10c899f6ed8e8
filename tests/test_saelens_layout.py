"""Each variant file owns its SAELens layout: the registry by cfg.json architecture, and what reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes import saelens_layout
from saelab.saes.saelens_format import export_sae, layout_of, load_exported
from saelab.saes.saelens_layout import SAELensLayout, find_layout, known_architectures, register_layout
from tests.conftest import REPO


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the registry for one test, so layouts declared here do not outlive it."""
    known_architectures()  # the built-in variant files registered first
    monkeypatch.setattr(saelens_layout, "_LAYOUTS", dict(saelens_layout._LAYOUTS))


def test_every_architecture_name_belongs_to_the_variant_file_that_declares_it():
    """SAELens's names where it has a layout, saelab-named transcoders elsewhere, each from one variant file."""
    assert known_architectures() == ["gated", "jumprelu", "saelab_gated_untied", "standard", "topk"]
    owners = {
        "standard": "relu", "transcoder": "relu", "skip_transcoder": "relu",
        "jumprelu": "jumprelu", "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu",
        "topk": "topk", "saelab_topk_transcoder": "topk", "saelab_topk_skip_transcoder": "topk",
        "gated": "gated", "saelab_gated_transcoder": "gated", "saelab_gated_skip_transcoder": "gated",
        "saelab_gated_untied": "gated", "saelab_gated_untied_skip_transcoder": "gated",
    }
    for name, variant in owners.items():
        assert find_layout(name).encode.__module__ == f"saelab.saes.{variant}", name
    assert find_layout("saelab_relu_transcoder") is None and find_layout("batchtopk") is None


def test_a_layout_declared_outside_saelab_is_exported_and_loaded_with_its_own_encoder(registry, tmp_path):
    """A variant from elsewhere declares a layout of its own: its exports load, and its encoder runs on them."""
    from saelab.saes.base import build_sae

    def halved_relu(tensors, cfg, x):
        return torch.relu(x @ tensors["W_enc"] + tensors["b_enc"]) / 2

    layout = register_layout(SAELensLayout("saelab_toy", halved_relu))
    sae = build_sae({"_target_": "saelab.saes.relu.ReluSAE", "d_in": 8, "d_sae": 16, "d_out": 4})
    sae.saelens_architecture = "saelab_toy"
    exported = load_exported(export_sae(sae, 1.0, tmp_path / "toy", {}))
    assert exported.cfg["architecture"] == "saelab_toy_transcoder" and exported.layout is layout
    x = torch.randn(5, 8)
    assert torch.equal(exported.encode(x), torch.relu(x @ exported.W_enc + exported.b_enc) / 2)


def test_an_architecture_no_variant_declares_is_refused_in_one_line_naming_those_that_are():
    known = "gated, jumprelu, saelab_gated_untied, standard, topk"
    with pytest.raises(ConfigError, match=rf"architecture='saelab_nope' is not allowed: .*{known}"):
        layout_of({"architecture": "saelab_nope"})


def test_two_layouts_cannot_claim_one_name(registry):
    def encode(tensors, cfg, x):
        return x

    with pytest.raises(ValueError, match="'transcoder' is claimed by layouts 'standard' and 'mine'"):
        register_layout(SAELensLayout("mine", encode, transcoder="transcoder"))


def test_variant_files_name_no_kernel_backend():
    """kernels/dispatch decides where a step runs; the variant files only call kernels/ functions."""
    for file in sorted((REPO / "src" / "saelab" / "saes").glob("*.py")):
        text = Path(file).read_text()
        assert not re.search(r"dispatch|native", text), file.name
