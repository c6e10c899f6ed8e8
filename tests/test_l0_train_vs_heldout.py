"""scripts/l0_train_vs_heldout.py: a job's L0 on the activations it trained on, beside its held-out L0."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, run_cli, tiny_overrides


def test_it_reads_each_jobs_own_training_stream_and_held_out_set(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """On a real (tiny) sweep: one row per job; its held-out L0 is the run's own metrics.json figure (the script
    warns otherwise, so the same held-out set and scale were used); TopK's training-stream L0 is its k; ReLU's,
    from the same scaled activations, is close to its held-out L0 (unscaled inputs would move it far)."""
    sweep = tmp_path / "sweep"
    overrides = tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out")
    result = run_cli(["-m", *overrides, "sae=relu,topk", "sae.target_l0=4", "data.seed=0", f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-2000:]

    listed = subprocess.run([sys.executable, str(REPO / "scripts" / "l0_train_vs_heldout.py"), str(sweep),
                             *(o for o in overrides if not o.startswith("sae."))],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "warning" not in listed.stderr
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[1:-1]]
            for line in listed.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()}
    assert sorted(rows) == ["0", "1"]
    for job, cells in rows.items():
        held_out = json.loads((sweep / job / "metrics.json").read_text())["l0"]
        train_l0, printed_held_out = float(cells[3]), float(cells[4])
        assert abs(printed_held_out - held_out) < 0.006
        variant = json.loads((sweep / job / "metrics.json").read_text())["variant"]
        if variant == "TopKSAE":
            assert 3.9 <= train_l0 <= 4.0
        else:
            assert abs(train_l0 / held_out - 1) < 0.3, (train_l0, held_out)
