"""An exported SAE whose weights hold a NaN or inf is refused by everything that loads one (saelab-eval, init_from,
saelab-dashboard): one line naming the tensor, exit code 2, nothing written, before any model loads (issue #33: it
used to evaluate to `fvu: nan` and exit 0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import ConfigError
from saelab.saes.saelens_format import read_sae_dir
from tests.conftest import run_cli, tiny_overrides

FIXTURE = Path(__file__).parent / "fixtures" / "saelens" / "standard"  # an SAE SAELens itself saved (d_in 32)
WEIGHTS = "sae_weights.safetensors"


def poisoned_copy(directory: Path, tensor: str, values: list[float]) -> Path:
    """A copy of the SAELens fixture with `values` written into the first entries of `tensor`."""
    shutil.copytree(FIXTURE, directory)
    tensors = load_file(directory / WEIGHTS)
    flat = tensors[tensor].flatten()
    flat[: len(values)] = torch.tensor(values)
    tensors[tensor] = flat.reshape(tensors[tensor].shape).contiguous()
    save_file(tensors, str(directory / WEIGHTS))
    return directory


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_names_the_tensor(lines: list[str], field: str, tensor: str, count: int) -> None:
    """One error line, for `field`, naming the weights file, the tensor and how many values are not finite."""
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {field}="), lines
    assert WEIGHTS in lines[0] and f"{tensor} holds {count} NaN/inf" in lines[0], lines


@pytest.mark.parametrize(("tensor", "values"), [("W_enc", [float("nan"), float("nan"), float("inf")]),
                                                ("b_dec", [float("-inf")])])
def test_the_export_reader_names_the_non_finite_tensor(tensor, values, tmp_path):
    """NaN and inf (of either sign), in any tensor; the untouched fixture still reads."""
    assert read_sae_dir(FIXTURE)["d_sae"] == 64
    bad = poisoned_copy(tmp_path / "bad", tensor, values)
    with pytest.raises(ConfigError) as err:
        read_sae_dir(bad)
    assert f"{tensor} holds {len(values)} NaN/inf" in str(err.value) and WEIGHTS in str(err.value)


def test_saelab_eval_refuses_it_before_the_model_loads(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys,
                                                       monkeypatch):
    from saelab.cli import evaluate

    def no_model(*args, **kwargs):  # evaluate() loads the model; make_plan() checks what it can before
        raise AssertionError("evaluation started: the weights were not checked before the model loads")

    monkeypatch.setattr(evaluate, "evaluate", no_model)
    bad = poisoned_copy(tmp_path / "bad", "W_enc", [float("nan"), float("inf"), float("nan")])
    out = tmp_path / "eval"
    code = evaluate.main([str(bad), *tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "outputs"),
                          "--out", str(out)])
    assert code == 2
    assert_names_the_tensor(error_lines(capsys.readouterr().err), "sae_dir", "W_enc", 3)
    assert not out.exists() and not list(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
def test_init_from_refuses_it_in_one_line(tiny_model_dir, tiny_corpus_dir, tmp_path):
    bad = poisoned_copy(tmp_path / "bad", "W_dec", [float("nan")])
    out = tmp_path / "outputs"
    args = [a for a in tiny_overrides(tiny_model_dir, tiny_corpus_dir, out) if not a.startswith("sae.")]
    result = run_cli([*args, "sae=relu", "sae.expansion_factor=2", f"init_from={bad}", "trainer.max_steps=2",
                      "eval.spliced_windows=0"], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_names_the_tensor(error_lines(result.stderr), "init_from", "W_dec", 1)
    assert not list(out.rglob("metrics.json")) and not list(out.rglob("checkpoints"))


def test_the_dashboard_refuses_it(tmp_path, capsys):
    from saelab.dashboard.cli import main

    bad = poisoned_copy(tmp_path / "bad", "b_enc", [float("inf"), float("inf")])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        main([str(bad)])
    assert exit_.value.code == 2
    assert_names_the_tensor(error_lines(capsys.readouterr().err), "path", "b_enc", 2)
    assert sorted(tmp_path.rglob("*")) == before
