"""The SAELens cross-check's pure-python parts (scripts/saelens_crosscheck/score.py): the batch top-k scoring of a
SAELens BatchTopK export against saelab's own (eval.batch_topk), and the table's seed statistics."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from saelab.saes import build_sae
from saelab.saes.saelens_format import export_sae, load_exported

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts" / "saelens_crosscheck"))
import score  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread


@pytest.mark.parametrize("target", ["saelab.saes.batchtopk.BatchTopKSAE",
                                    "saelab.saes.matryoshka_batchtopk.MatryoshkaBatchTopKSAE"])
def test_batch_topk_of_an_export_is_saelabs_batch_topk(tmp_path, target):
    """score.py's BatchTopKExported on a BatchTopK export selects what saelab's encode_batch_topk selects on the
    same weights: the batch's B k largest ReLU'd pre-activations (and not the export's learned threshold)."""
    torch.manual_seed(0)
    sae = build_sae({"_target_": target, "d_in": 16, "d_sae": 64, "k": 4})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.threshold.fill_(0.5)
    x = torch.randn(32, 16)
    exported = load_exported(export_sae(sae, 1.0, tmp_path / "sae", {}))
    view = score.BatchTopKExported(exported, 4.0)
    f = view.encode(x)
    assert torch.allclose(f, sae.encode_batch_topk(x), atol=1e-5)
    assert int((f > 0).sum()) == 32 * 4
    assert not torch.equal(f, exported.encode(x))  # the threshold's encoding differs
    assert torch.allclose(view.output(x, f), sae.output(x, f), atol=1e-5)


def test_compare_reports_the_difference_in_pooled_seed_sds():
    rows = [{"impl": impl, "variant": "topk", "target_l0": 25.0, **{m: math.nan for m in score.METRICS}} | {"mcc": v}
            for impl, values in (("saelab", (0.90, 0.92, 0.94)), ("SAELens", (0.80, 0.81, 0.82))) for v in values]
    (row,) = score.compare(rows)
    assert row["mcc_saelab_mean"] == pytest.approx(0.92) and row["mcc_SAELens_mean"] == pytest.approx(0.81)
    pooled = math.sqrt((0.02 ** 2 + 0.01 ** 2) / 2)
    assert row["mcc_d_pooled"] == pytest.approx(0.11 / pooled)
    assert row["mcc_welch_t"] == pytest.approx(0.11 / math.sqrt(0.02 ** 2 / 3 + 0.01 ** 2 / 3))
    assert math.isnan(row["fvu_d_pooled"])
    assert "**+" in score.markdown([row], "t")  # |d| > 2 is bold


def test_paper_table_takes_the_papers_f1_convention_per_variant():
    """paper_table.py: F1 is the batch top-k's for BatchTopK / Matryoshka and synthsaebench_f1 otherwise, beside
    the paper's numbers; other L0 targets are left out."""
    import paper_table

    def run(variant, impl, seed, l0=25.0):
        return {"impl": impl, "variant": variant, "target_l0": str(l0), "seed": str(seed), "l0": "25",
                "mcc": "0.5", "fvu": "0.2", "dead_fraction": "0", "synthsaebench_f1": "0.1",
                "batch_topk_synthsaebench_f1": "0.9" if variant in paper_table.BATCH_TOPK else ""}

    rows = [run(v, impl, s) for v in ("batchtopk", "relu") for impl in ("saelab", "SAELens") for s in (0, 1)]
    text = paper_table.table(rows + [run("relu", "saelab", 0, l0=8.0) | {"mcc": "9"}], 25.0)
    lines = text.splitlines()
    assert "| BatchTopK | paper (200M samples) | 5 | 25 | 0.732 | 0.757 | - | - |" in lines
    same = "0.500 ± 0.000 | 0.200 ± 0.000 | 0.000 ± 0.000 |"
    assert "| BatchTopK | saelab | 2 | 25.0 ± 0.0 | 0.900 ± 0.000 | " + same in lines
    assert "| Standard L1 | SAELens | 2 | 25.0 ± 0.0 | 0.100 ± 0.000 | " + same in lines
    assert "9.000" not in text and "Matryoshka BatchTopK | paper" in text
    assert "Matryoshka BatchTopK | saelab" not in text


def _saelab_job(out: Path, name: str, sae: dict, overrides: list[str]) -> None:
    """A saelab run directory as score.read_saelab reads it: overrides, resolved config, metrics."""
    job = out / "saelab" / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "sae": sae}))
    (job / "metrics.json").write_text(json.dumps({"l0": 8.1, "mcc": 0.9}))


def test_a_fixed_coefficient_run_is_compared_with_saelens_at_the_same_coefficient(tmp_path):
    """A saelab run with no sae.target_l0 (SAELens's recipe at SAELens's own calibrated coefficient) takes the L0
    target of the SAELens runs trained at that coefficient, and the coefficient is no variant label; a coefficient
    SAELens never trained at is a one-line error naming the field."""
    (tmp_path / "saelens_coefficient").mkdir()
    (tmp_path / "saelens_coefficient" / "plan.json").write_text(json.dumps(
        [{"name": "gated_l08_s0", "arch": "gated", "target_l0": 8.0, "seed": 0, "value": 0.3623, "d_sae": 512}]))
    gated = {"_target_": "saelab.saes.gated.GatedSAE", "target_l0": None, "sparsity_coefficient": 0.3623}
    _saelab_job(tmp_path, "0", gated, ["sae=gated", "sae.sparsity_coefficient=0.3623", "seed=0"])
    (row,) = score.read_saelab(tmp_path)
    assert (row["variant"], row["target_l0"], row["coefficient"]) == ("gated", 8.0, 0.3623)
    _saelab_job(tmp_path, "1", gated | {"sparsity_coefficient": 0.5}, ["sae=gated", "sae.sparsity_coefficient=0.5"])
    with pytest.raises(SystemExit, match="sae.sparsity_coefficient 0.5 is none of SAELens's coefficients"):
        score.read_saelab(tmp_path)
