"""Plot crosscoders' relative decoder norm histograms (metrics.json's relative_norm_histogram) side by side.

    python scripts/relative_norm_histograms.py OUT.png RUN_DIR[=LABEL] ...

Each run directory's metrics.json holds the counts of its firing latents in 20 bins of Minder et al.'s relative
decoder norm over [0, 1] (0: the first site only, 1: the last site only; metrics/sites.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, runs = Path(argv[0]), argv[1:]
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        directory, _, label = run.partition("=")
        metrics = json.loads((Path(directory) / "metrics.json").read_text())
        counts = metrics["relative_norm_histogram"]
        edges = [i / len(counts) for i in range(len(counts))]
        ax.bar(edges, counts, width=1 / len(counts), align="edge", color="tab:blue", edgecolor="white")
        ax.axvline(0.9, color="tab:red", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{label or metrics['variant']}: {metrics['exclusive_b_latents']} B-only", fontsize=9)
        ax.set_xlabel("relative decoder norm (0: A only, 1: B only)")
    axes[0][0].set_ylabel("firing latents")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
