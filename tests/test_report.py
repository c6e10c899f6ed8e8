"""saelab-report on a synthetic, partly failed multirun directory, and the Pareto frontier itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from saelab.reports.pareto import pareto_front
from saelab.reports.report import main
from saelab.reports.sweep import collect

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COEFFICIENTS = (0.01, 0.03, 0.1)


def write_job(job_dir: Path, overrides: list[str], metrics: dict | None = None) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps({**metrics, "overrides": overrides}))


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """12 finished jobs (relu/gated x aux_loss on/off x 3 coefficients), one incomplete, two failed."""
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    num = 0
    for variant, aux_offset in (("relu", 0.0), ("gated", -0.05)):
        for aux_loss in ("true", "false"):
            for i, coef in enumerate(COEFFICIENTS):
                l0 = 100.0 / (i + 1)
                fvu = 0.1 * (i + 1) + aux_offset + (0.02 if aux_loss == "false" else 0.0)
                metrics = {"l0": l0, "fvu": fvu, "explained_variance": 1 - fvu, "delta_lm_loss": fvu / 2,
                           "variant": f"{variant.title()}SAE", "architecture": variant, "d_sae": 256,
                           "steps": 100, "tokens_trained": 25600, "wall_time_s": 3.0, "dead_fraction": 0.0}
                overrides = ["model=tiny", f"sae={variant}", f"sae.sparsity_coefficient={coef}",
                             f"+sae.aux_loss={aux_loss}", f"seed={num % 2}"]
                write_job(root / str(num), overrides, metrics)
                num += 1
    base = ["model=tiny", "sae=gated", "sae.sparsity_coefficient=1.0", "+sae.aux_loss=true", "seed=0"]
    write_job(root / "12", base)  # still running: nothing but its .hydra
    write_job(root / "13", base)
    (root / "13" / "error.txt").write_text("Traceback (most recent call last):\n  File x\n"
                                           "RuntimeError: CUDA out of memory\n")
    write_job(root / "14", base)
    (root / "14" / "train.log").write_text("[2026][saelab][INFO] - corpus: 10 windows\n"
                                           "[2026][saelab][ERROR] - ValueError: loss is NaN at step 7\n")
    return root


def test_pareto_front_excludes_dominated_points():
    xs = [1, 2, 3, 4, 2.5, 5, 3]
    ys = [5, 3, 4, 1, 2, 1, 3]
    # (3,4) is beaten by (2,3); (5,1) by (4,1); the second (3,3) by (2,3); (2.5,2) stays.
    assert pareto_front(xs, ys) == [0, 1, 4, 3]


def test_pareto_front_maximising_ties_and_nan():
    xs = [1, 1, 2, 3, math.nan, 4]
    ys = [0.5, 0.7, 0.7, 0.9, 1.0, 0.9]
    assert pareto_front(xs, ys, maximize_y=True) == [1, 3]
    assert pareto_front([2, 2], [1, 1]) == [0]  # identical points: one kept
    assert pareto_front([], []) == []


def test_default_grouping_leaves_out_the_coefficient_and_seed(sweep_dir):
    sweep = collect(sweep_dir)
    assert sweep.swept == "sae.sparsity_coefficient"
    assert set(sweep.varying) >= {"sae", "sae.aux_loss", "seed", "sae.sparsity_coefficient"}
    assert "model" not in sweep.varying
    ok = sweep.table[sweep.table["status"] == "ok"]
    assert sorted(ok["series"].unique()) == ["sae=gated, sae.aux_loss=false", "sae=gated, sae.aux_loss=true",
                                             "sae=relu, sae.aux_loss=false", "sae=relu, sae.aux_loss=true"]
    by_variant = collect(sweep_dir, ["variant"]).table
    ok_series = set(by_variant.loc[by_variant["status"] == "ok", "series"])
    assert ok_series == {"variant=ReluSAE", "variant=GatedSAE"}


def test_report_on_partial_sweep(sweep_dir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out

    table = pd.read_csv(sweep_dir / "report.csv", dtype={"job": str})
    assert list(table["job"]) == [str(i) for i in range(15)]
    status = dict(zip(table["job"], table["status"], strict=True))
    assert [status[j] for j in ("0", "11", "12", "13", "14")] == ["ok", "ok", "incomplete", "failed",
                                                                   "failed"]
    errors = dict(zip(table["job"], table["error"], strict=True))
    assert "CUDA out of memory" in errors["13"]
    assert "loss is NaN at step 7" in errors["14"] and "train.log" in errors["14"]
    assert pd.isna(errors["12"]) and pd.isna(errors["0"])
    assert table.loc[table["job"] == "0", "fvu"].item() == pytest.approx(0.1)

    assert "# Sweep report" in out and "15 jobs: 12 ok, 2 failed, 1 incomplete" in out
    assert "| job | status | series | sae.sparsity_coefficient | l0 | fvu | delta_lm_loss |" in out
    assert "| 13 | failed |" in out and "| 12 | incomplete |" in out
    assert "- 13 (failed): Traceback (most recent call last): / File x / RuntimeError: CUDA out of memory" \
        in out

    for name in ("pareto_l0_vs_fvu.png", "pareto_l0_vs_delta_lm_loss.png"):
        png = sweep_dir / name
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"Plot: {png}" in out
    assert not (sweep_dir / "pareto_l0_vs_spliced_hidden_cosine.png").exists()


def test_report_out_dir_and_group_by(sweep_dir, tmp_path, capsys):
    out_dir = tmp_path / "report"
    assert main([str(sweep_dir), "--out", str(out_dir), "--group-by", "sae", "--y", "explained_variance",
                 "--wandb", "off"]) == 0
    table = pd.read_csv(out_dir / "report.csv")
    assert set(table["series"]) == {"sae=relu", "sae=gated"}
    assert (out_dir / "pareto_l0_vs_explained_variance.png").read_bytes()[:8] == PNG_MAGIC
    assert not (sweep_dir / "report.csv").exists()


def test_report_errors(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_report_cli_subprocess(sweep_dir):
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "saelab.reports.report", str(sweep_dir)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| 14 | failed |" in proc.stdout
    assert (sweep_dir / "report.csv").is_file()


def test_one_job_per_override_value_falls_back_to_one_series_per_variant(tmp_path):
    """experiment=variant_pareto sweeps `+point=<variant>_<level>`: series must still be the variants."""
    from saelab.reports.sweep import collect

    for job, (point, variant, l0, fvu) in enumerate([("relu_a", "ReluSAE", 10, 0.5), ("relu_b", "ReluSAE", 50, 0.3),
                                                      ("topk_a", "TopKSAE", 16, 0.2), ("topk_b", "TopKSAE", 32, 0.1)]):
        job_dir = tmp_path / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text(f"- +point={point}\n- experiment=variant_pareto\n")
        (job_dir / "metrics.json").write_text(json.dumps({"l0": l0, "fvu": fvu, "variant": variant}))
    series = collect(tmp_path).table.set_index("job")["series"]
    assert series.nunique() == 2 and series.iloc[0] == series.iloc[1] != series.iloc[2] == series.iloc[3]


def test_jobs_differing_only_by_seed_become_one_row_with_mean_and_std(tmp_path, capsys):
    """Two settings x three seeds: one row per setting with the seeds' mean and sample standard deviation,
    in report_seeds.csv, a mean ± std table and Pareto plots with error bars."""
    import statistics

    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    values = {}
    num = 0
    for coef in (0.1, 0.3):
        for seed in range(3):
            l0, fvu = 50 / coef + 3 * seed, coef + 0.01 * seed * seed
            values.setdefault(coef, []).append((l0, fvu))
            write_job(root / str(num), ["sae=relu", f"sae.sparsity_coefficient={coef}", f"seed={seed}"],
                      {"l0": l0, "fvu": fvu, "variant": "ReluSAE", "wall_time_s": 1.0})
            num += 1
    assert main([str(root), "--wandb", "off"]) == 0
    out = capsys.readouterr().out
    by_seed = pd.read_csv(root / "report_seeds.csv").set_index("sae.sparsity_coefficient")
    for coef, points in values.items():
        row = by_seed.loc[coef]
        assert row["n_seeds"] == 3
        assert row["l0"] == pytest.approx(statistics.mean(p[0] for p in points))
        assert row["l0_std"] == pytest.approx(statistics.stdev(p[0] for p in points))
        assert row["fvu_std"] == pytest.approx(statistics.stdev(p[1] for p in points))
    assert "## Over seeds (mean ± std)" in out and " ± " in out
    png = root / "pareto_seeds_l0_vs_fvu.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and f"Plot: {png}" in out


def test_no_seed_table_when_every_setting_has_one_seed(sweep_dir, capsys):
    assert main([str(sweep_dir), "--wandb", "off"]) == 0
    assert not (sweep_dir / "report_seeds.csv").exists() and "Over seeds" not in capsys.readouterr().out


# FVU per seed (0, 1, 2) of a frozen/unfrozen ablation at two matched targets: frozen clearly lower at 8, equal
# in distribution at 24.
ABLATION = {("frozen_decoder", "8"): (0.30, 0.31, 0.29), ("unfrozen_decoder", "8"): (0.40, 0.42, 0.41),
            ("frozen_decoder", "24"): (0.20, 0.22, 0.18), ("unfrozen_decoder", "24"): (0.21, 0.19, 0.20)}


def test_compare_regenerates_a_claims_verdict_with_welchs_t_test(tmp_path, capsys):
    """--compare sae.aux_loss=frozen_decoder,unfrozen_decoder over a seeds x targets sweep: per target, each side's
    mean ± std and Welch's t-test, whose t and df are recomputed here from their definitions; the verdict line
    counts the significant settings."""
    root = tmp_path / "multirun"
    num = 0
    for (aux_loss, target), fvus in ABLATION.items():
        for seed, fvu in enumerate(fvus):
            write_job(root / str(num), [f"sae.aux_loss={aux_loss}", f"sae.target_l0={target}", f"seed={seed}"],
                      {"l0": float(target), "fvu": fvu, "variant": "GatedSAE"})
            num += 1
    assert main([str(root), "--compare", "sae.aux_loss=frozen_decoder,unfrozen_decoder", "--metric", "fvu",
                 "--wandb", "off"]) == 0
    result = pd.read_csv(root / "comparison.csv").set_index("setting")
    for target in ("8", "24"):
        a, b = pd.Series(ABLATION["frozen_decoder", target]), pd.Series(ABLATION["unfrozen_decoder", target])
        se2 = a.var() / 3 + b.var() / 3  # Welch: unequal variances, sample variances (ddof 1)
        t = (a.mean() - b.mean()) / math.sqrt(se2)
        df = se2**2 / ((a.var() / 3) ** 2 / 2 + (b.var() / 3) ** 2 / 2)
        row = result.loc[f"sae.target_l0={target}"]
        assert row["t"] == pytest.approx(t) and row["df"] == pytest.approx(df)
        assert row["mean_a"] == pytest.approx(a.mean()) and row["std_b"] == pytest.approx(b.std())
    assert result.loc["sae.target_l0=8", "p"] < 0.01 < 0.5 < result.loc["sae.target_l0=24", "p"]
    out = capsys.readouterr().out
    assert ("fvu: frozen_decoder below unfrozen_decoder in 1, above in 0, not distinguishable (p >= 0.05 or under 2 "
            "seeds a side) in 1 of 2 settings") in out


def test_compare_names_a_key_that_is_not_an_override(tmp_path):
    root = tmp_path / "multirun"
    write_job(root / "0", ["sae.aux_loss=frozen_decoder"], {"l0": 8.0, "fvu": 0.3})
    write_job(root / "1", ["sae.aux_loss=unfrozen_decoder"], {"l0": 8.0, "fvu": 0.4})
    with pytest.raises(SystemExit, match=r"--compare sae.gate: not an override of these runs"):
        main([str(root), "--compare", "sae.gate=heaviside,sigmoid", "--wandb", "off"])
