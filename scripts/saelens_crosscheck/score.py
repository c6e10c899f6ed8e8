"""Score and tabulate the cross-check (run in saelab's venv).

    score.py OUT [overrides]

Every SAELens SAE under OUT/saelens*/<name> (directories with a plan.json; saved by train_saelens.py, inputs in
saelab's normalised units) is
measured exactly as a saelab run measures itself at its end: `saelab.run.evaluation.held_out_metrics` on the
held-out activations of the stream the overrides open (reconstruction metrics, then
`saelab.metrics.ground_truth.ground_truth_metrics` on the same encode). saelab's runs (OUT/saelab/<job>/
metrics.json) were measured by that same function by saelab-train. Then one table per (variant, L0 target):
mean ± sd over seeds of each metric on both sides, and the difference saelab - SAELens in units of the pooled
seed standard deviation, d = (m_saelab - m_SAELens) / sqrt((s_saelab^2 + s_SAELens^2) / 2) (Cohen's d; the csv also
has Welch's t = difference / sqrt(s1^2/n1 + s2^2/n2)). Writes OUT/crosscheck.md, OUT/crosscheck.csv and
OUT/runs.csv (one row per SAE).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

METRICS = ("l0", "fvu", "mcc", "firing_f1", "synthsaebench_f1", "dead_fraction", "batch_topk_synthsaebench_f1")
BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")  # also scored by the batch top-k (SynthSAEBench's way)
NAMES = {"relu": "ReLU/L1", "gated": "Gated", "jumprelu": "JumpReLU", "topk": "TopK", "batchtopk": "BatchTopK",
         "matryoshka_batchtopk": "Matryoshka BatchTopK"}
SHORT = {"synthsaebench_f1": "sb_f1", "batch_topk_synthsaebench_f1": "bt_sb_f1"}
VARIANT_OF_TARGET = {"ReluSAE": "relu", "GatedSAE": "gated", "JumpReLUSAE": "jumprelu", "TopKSAE": "topk",
                     "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk"}


class Normalised(nn.Module):
    """A SAELens SAE saved on saelab's normalised inputs: evaluate_sae's interface (encode, output, d_sae, W_dec)."""

    def __init__(self, exported: nn.Module):
        super().__init__()
        self.exported = exported
        self.d_sae = int(exported.cfg["d_sae"])

    @property
    def W_dec(self) -> Tensor:
        return self.exported.W_dec

    def encode(self, x: Tensor) -> Tensor:
        return self.exported.encode(x)

    def output(self, x: Tensor, f: Tensor) -> Tensor:
        return self.exported.output(x, f)


class BatchTopKExported(Normalised):
    """A SAELens BatchTopK / Matryoshka export (its "jumprelu" inference form) scored by the batch top-k, as it
    trained and as SynthSAEBench scores it: the B k largest ReLU'd pre-activations over each evaluation batch
    (the export folds the decoder norms into W_enc, so these are the rescaled activations SAELens selects on), not
    the learned threshold; saelab's side is its `eval.batch_topk` (BatchTopKView)."""

    def __init__(self, exported: nn.Module, k: float):
        super().__init__(exported)
        self.k = int(round(k))

    def encode(self, x: Tensor) -> Tensor:
        e = self.exported
        pre = ((x - e.b_dec) @ e.W_enc + e.b_enc).relu()
        values, flat = pre.flatten().topk(min(pre.numel(), x.shape[0] * self.k))
        return torch.zeros_like(pre).flatten().index_put_((flat,), values).view_as(pre)


def saelens_plans(out: Path) -> list[tuple[Path, list[dict]]]:
    """Each directory OUT/saelens*/ with the plan (name, arch, target_l0, seed, value, d_sae per SAE) it trained."""
    return [(plan.parent, json.loads(plan.read_text())) for plan in sorted(out.glob("saelens*/plan.json"))]


def score_saelens(out: Path, overrides: list[str]) -> list[dict]:
    from feed import open_stream

    cfg, stream, hook = open_stream(overrides)
    rows = []
    for directory, plan in saelens_plans(out):
        rows += score_dir(directory, plan, cfg, stream, hook)
    return rows


def score_dir(directory: Path, plan: list[dict], cfg, stream, hook: str) -> list[dict]:
    from saelab.run.evaluation import held_out_metrics
    from saelab.saes.saelens_format import load_exported
    from saelab.sites import Sites

    own_l0 = json.loads((directory / "saelens_l0.json").read_text())
    rows = []
    for entry in plan:
        exported = load_exported(directory / entry["name"])
        metrics, _ = held_out_metrics(Normalised(exported), stream, Sites.of(hook), int(cfg.eval.batch_size))
        if abs(metrics["l0"] - own_l0[entry["name"]]) > 1e-3 * max(1.0, own_l0[entry["name"]]):
            print(f"warning: {entry['name']}: L0 {metrics['l0']:.4f} in saelab's reading of the export, "
                  f"{own_l0[entry['name']]:.4f} in SAELens's own forward", file=sys.stderr)
        if entry["arch"] in BATCH_TOPK:
            by_topk, _ = held_out_metrics(BatchTopKExported(exported, entry["target_l0"]), stream, Sites.of(hook),
                                          int(cfg.eval.batch_size))
            metrics |= {f"batch_topk_{name}": value for name, value in by_topk.items()}
        variant = entry["arch"] + (f" [{entry['tag']}]" if entry.get("tag") else "")
        rows.append({"impl": "SAELens", "variant": variant, "target_l0": float(entry["target_l0"]),
                     "seed": int(entry["seed"]), "coefficient": entry["value"],
                     "run": f"{directory.name}/{entry['name']}",
                     **{m: metrics.get(m, math.nan) for m in METRICS}})
    return rows


def read_saelab(out: Path) -> list[dict]:
    """saelab's runs under OUT/saelab (any depth); a run whose overrides differ from those of the other runs of its
    variant in more than the L0 target and seed (an ablation sweep) is labelled with those overrides, e.g.
    "topk [sae.decoder_init_norm=0.1]"; a recipe knob a whole variant shares (e.g. JumpReLU's runs at another
    decoder_init_norm, trained in their own sweep) is not a label. A run at a fixed coefficient (no sae.target_l0)
    is compared with the SAELens runs trained at that same coefficient: both implementations on one loss."""
    rows, jobs = [], []
    for metrics_file in sorted((out / "saelab").glob("**/metrics.json")):
        job = metrics_file.parent
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        not_labels = ("seed", "sae", "sae.target_l0", "sae.sparsity_coefficient")
        jobs.append((job, metrics_file, cfg, VARIANT_OF_TARGET[cfg["sae"]["_target_"].rsplit(".", 1)[1]],
                     [o for o in overrides if o.split("=", 1)[0] not in not_labels]))
    calibrated = {(e["arch"], float(e["value"])): float(e["target_l0"]) for _, plan in saelens_plans(out) for e in plan}
    common = {v: set.intersection(*(set(o) for _, _, _, w, o in jobs if w == v)) for v in {j[3] for j in jobs}}
    for job, metrics_file, cfg, arch, overrides in jobs:
        sae, variant = cfg["sae"], arch
        own = [o for o in overrides if o not in common[variant]]
        if own:
            variant += f" [{' '.join(own)}]"
        metrics = json.loads(metrics_file.read_text())
        target, coefficient = sae["target_l0"], ""
        if target is None:  # a fixed coefficient: compared with the SAELens runs trained at the same one
            coefficient = float(sae["sparsity_coefficient"])
            target = calibrated.get((arch, coefficient))
            if target is None:
                raise SystemExit(f"{job}: sae.target_l0 is null and sae.sparsity_coefficient {coefficient} is none of "
                                 f"SAELens's coefficients under {out}/saelens*/plan.json: set either to compare")
        rows.append({"impl": "saelab", "variant": variant, "target_l0": float(target),
                     "seed": int(cfg["seed"]), "coefficient": coefficient, "run": str(job.relative_to(out)),
                     **{m: metrics.get(m, math.nan) for m in METRICS}})
    return rows


def stats(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if not math.isnan(x)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return mean, sd, n


def compare(rows: list[dict]) -> list[dict]:
    table = []
    order = list(NAMES)

    def rank(key: tuple[str, float]) -> tuple:
        base = key[0].split(" [")[0]
        return key[1], order.index(base) if base in order else 99, key[0]

    keys = sorted({(r["variant"], r["target_l0"]) for r in rows}, key=rank)
    for variant, target in keys:
        row = {"variant": variant, "target_l0": target}
        for metric in METRICS:
            sides = {}
            for impl in ("saelab", "SAELens"):
                sides[impl] = stats([r[metric] for r in rows if r["impl"] == impl and r["variant"] == variant
                                     and r["target_l0"] == target])
                row[f"{metric}_{impl}_mean"], row[f"{metric}_{impl}_sd"], row[f"{metric}_{impl}_n"] = sides[impl]
            (m1, s1, n1), (m2, s2, n2) = sides["saelab"], sides["SAELens"]
            diff = m1 - m2
            pooled = math.sqrt((s1 ** 2 + s2 ** 2) / 2) if n1 > 1 and n2 > 1 else math.nan
            se = math.sqrt(s1 ** 2 / n1 + s2 ** 2 / n2) if n1 > 1 and n2 > 1 else math.nan
            row[f"{metric}_diff"] = diff
            if math.isnan(pooled) or math.isnan(diff):
                row[f"{metric}_d_pooled"] = math.nan
            elif pooled > 0:
                row[f"{metric}_d_pooled"] = diff / pooled
            else:
                row[f"{metric}_d_pooled"] = math.copysign(math.inf, diff) if diff else 0.0
            row[f"{metric}_welch_t"] = diff / se if se and se > 0 else math.nan
        table.append(row)
    return table


def fmt(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if not math.isnan(sd) else "")


def markdown(table: list[dict], title: str) -> str:
    lines = [f"## {title}", "",
             "Each cell: saelab / SAELens (mean ± sd over seeds) and d = (saelab - SAELens) / pooled sd "
             "(sqrt of the mean of the two variances); **bold** where |d| > 2. "
             "`firing_f1`: saelab's one-to-one convention; `sb_f1`: SynthSAEBench's (every latent, nearest feature); "
             "`bt_sb_f1`: `sb_f1` with BatchTopK / Matryoshka encoding by the batch top-k (the paper's way).",
             "",
             "| variant | L0 target | L0 | " + " | ".join(SHORT.get(m, m) for m in METRICS[1:]) + " |",
             "|---|---|---|" + "---|" * (len(METRICS) - 1)]
    for row in table:
        base, _, tag = row["variant"].partition(" [")
        cells = [NAMES.get(base, base) + (f" [{tag}" if tag else ""), f"{row['target_l0']:g}",
                 f"{row['l0_saelab_mean']:.2f} / {row['l0_SAELens_mean']:.2f}"]
        for metric in METRICS[1:]:
            d = row[f"{metric}_d_pooled"]
            dtext = "-" if math.isnan(d) else (f"{d:+.1f}" if math.isfinite(d) else ("+inf" if d > 0 else "-inf"))
            if not math.isnan(d) and abs(d) > 2:
                dtext = f"**{dtext}**"
            cells.append(f"{fmt(row[f'{metric}_saelab_mean'], row[f'{metric}_saelab_sd'])} / "
                         f"{fmt(row[f'{metric}_SAELens_mean'], row[f'{metric}_SAELens_sd'])} (d {dtext})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str]) -> int:
    out, overrides = Path(argv[0]), argv[1:]
    torch.set_num_threads(1)
    rows = read_saelab(out) + score_saelens(out, overrides)
    write_csv(out / "runs.csv", rows)
    table = compare(rows)
    write_csv(out / "crosscheck.csv", table)
    title = "saelab vs SAELens on identical samples: " + " ".join(overrides)
    (out / "crosscheck.md").write_text(markdown(table, title))
    print((out / "crosscheck.md").read_text())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
