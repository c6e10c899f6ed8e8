"""The export's `has_model` (run/results.export_metadata): written for a model's run and for a source without one,
and read by saelab-dashboard, which falls back to the old model_name == dataset_path sign for exports without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from saelab.dashboard.plan import make_plan, trained_without_model
from saelab.data.sources import build_source
from saelab.errors import ConfigError
from saelab.run.compose import compose_run_config
from saelab.run.results import export_metadata

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"


def _metadata(overrides: list[str]) -> dict:
    cfg = compose_run_config(overrides)
    source = build_source(cfg.data)
    return export_metadata(cfg, source, source.hooks(cfg.model)[0], None)


@pytest.mark.parametrize("data", ["synthetic", "synthsaebench"])
def test_a_source_without_a_model_is_recorded_as_such(data):
    metadata = _metadata([f"data={data}"])
    assert metadata["has_model"] is False
    assert metadata["model_name"] == metadata["dataset_path"] == data  # as before: the source names itself
    assert trained_without_model({"metadata": metadata})


def test_a_model_run_is_recorded_with_its_model(tmp_path):
    metadata = _metadata(["model=tiny", "data=text_files", f"data.path={tmp_path}"])
    assert metadata["has_model"] is True
    assert metadata["model_name"] == "tiny" and metadata["dataset_path"] == str(tmp_path)
    assert not trained_without_model({"metadata": metadata})


@pytest.mark.parametrize(("metadata", "without_model"), [
    ({"model_name": "tiny", "dataset_path": "tiny", "has_model": True}, False),  # the field wins over the names
    ({"model_name": "synthetic", "dataset_path": "x", "has_model": False}, True),
    ({"model_name": "synthetic", "dataset_path": "synthetic"}, True),  # an older saelab's synthetic export
    ({"model_name": "tiny", "dataset_path": "/corpus"}, False),  # an older saelab's model export
    ({"model_name": "gpt2", "hook_name": "blocks.0.hook_resid_pre"}, False),  # SAELens: no dataset_path
])
def test_trained_without_model_reads_the_field_else_the_old_sign(metadata, without_model):
    assert trained_without_model({"metadata": metadata}) is without_model
    assert trained_without_model(metadata) is without_model  # older SAELens exports: at the top level


def _export(tmp_path: Path, **metadata) -> Path:
    """The standard SAELens fixture with these metadata fields added."""
    directory = tmp_path / "sae"
    shutil.copytree(FIXTURES / "standard", directory)
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["metadata"] |= metadata
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def test_dashboard_refuses_an_export_without_a_model(tmp_path):
    with pytest.raises(ConfigError, match="a text source"):
        make_plan(_export(tmp_path, has_model=False), [f"out={tmp_path / 'out'}"])


@pytest.mark.parametrize("metadata", [{"has_model": True}, {}])  # with the field, and without it (SAELens)
def test_dashboard_plans_an_export_of_a_model(tmp_path, metadata):
    plan = make_plan(_export(tmp_path, **metadata), [f"out={tmp_path / 'out'}"])
    assert plan.hook == "blocks.0.hook_out" and plan.sae_cfg["metadata"]["model_name"] == "tiny"
