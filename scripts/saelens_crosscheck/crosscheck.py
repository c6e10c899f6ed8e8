"""saelab against SAELens on identical samples of a synthetic world (issue 25): the driver run.sh calls, in
saelab's venv. Steps, each skipped when its output is already in OUT (so a stopped run resumes):

1. feed.py: the held-out set and scale (OUT/data/heldout.pt) and the training stream, normalised and in order,
   as raw float32 (OUT/data/stream.f32), from the stream saelab-train opens for the same overrides;
2. saelab: one `saelab-train -m hydra/launcher=fanout` over every variant x L0 target x seed (OUT/saelab);
3. SAELens (train_saelens.py in the sae-lens venv): the variants whose L0 is k (topk, batchtopk, matryoshka)
   train at once (OUT/saelens_k) while, for those whose sparsity is a coefficient (relu, gated, jumprelu), the
   coefficient is calibrated to each L0 target on the first seed (full budget, log-log interpolation of held-out
   L0 against the coefficient: a SAELens user tunes it by hand; saelab's runs reach theirs with their L0
   controller); then those train at the calibrated coefficients (OUT/saelens_coefficient);
4. score.py: both sides scored by saelab's held-out and ground-truth metrics; OUT/crosscheck.{md,csv}.

    python crosscheck.py --venv SAELENS_VENV --out OUT [--variants ...] [--l0 8 16] [--seeds 0 1 2]
                         [--lr 3e-3] [--saelab-extra KEY=VALUE ...] -- [data overrides, e.g. data=synthetic]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COEFFICIENT_VARIANTS = ("relu", "gated", "jumprelu")
START = {"relu": 0.1, "gated": 0.1, "jumprelu": 0.01}  # first guesses (inputs with E||x||^2 = 1)
# Every training process at niceness CROSSCHECK_NICE (10), counting what the driver already has (nice is relative).
NICE = ["nice", "-n", str(max(0, int(os.environ.get("CROSSCHECK_NICE", "10")) - os.nice(0)))]
# One intra-op thread per process: on a shared, oversubscribed CPU, torch's threads spin-waiting on each other made
# a 32-job saelab fan-out ~10x slower (73 against ~6 ms per SAE-step, measured here).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(cmd: list[str], **kwargs) -> None:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    subprocess.run(NICE + cmd, check=True, **kwargs)


def saelens_train(args, plan: list[dict], out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / f"plan_{int(time.time() * 1000)}.json"
    plan_file.write_text(json.dumps(plan, indent=1))
    run([str(Path(args.venv) / "bin" / "python"), str(HERE / "train_saelens.py"), str(plan_file),
         str(args.out / "data" / "stream.f32"), str(args.out / "data" / "heldout.pt"), str(out),
         "--lr", str(args.lr)])
    return json.loads((out / "saelens_l0.json").read_text())


def matryoshka_widths(d_sae: int) -> list[int]:
    """saelab's default prefixes (conf/sae/matryoshka_batchtopk.yaml): [d_sae/64, d_sae/16, d_sae/4, d_sae]."""
    return [max(1, d_sae // 64), max(1, d_sae // 16), max(1, d_sae // 4), d_sae]


def entry(variant: str, target: float, seed: int, value: float, d_sae: int) -> dict:
    e = {"name": f"{variant}_l0{target:g}_s{seed}", "arch": variant, "target_l0": target, "seed": seed,
         "value": value, "d_sae": d_sae}
    if variant == "matryoshka_batchtopk":
        e["extra"] = {"matryoshka_widths": matryoshka_widths(d_sae)}
    return e


def calibrate(args, d_sae: int) -> dict[tuple[str, float], float]:
    """Each coefficient variant's coefficient for each L0 target, on the first seed. The coefficient -> held-out L0
    curve of a variant does not depend on the target, so every point trained (OUT/saelens_calibration/
    calibration.json: variant -> [[coefficient, L0], ...]) serves every target: each round trains, per target not
    yet within --l0-tolerance, the coefficient that log-log interpolation between the points bracketing it predicts
    (a secant step from the nearest two outside them; slope -1 from a single point, where the coefficients x/3 and
    x3 are trained too, to find the slope)."""
    log_file = args.out / "saelens_calibration" / "calibration.json"
    history: dict[str, list] = json.loads(log_file.read_text()) if log_file.exists() else {}
    for round_dir in sorted((args.out / "saelens_calibration").glob("round*")):  # rounds a stopped run finished
        done = round_dir / "saelens_l0.json"
        if not done.exists():
            continue
        l0s = json.loads(done.read_text())
        for plan_file in round_dir.glob("plan_*.json"):
            for e in json.loads(plan_file.read_text()):
                point = [e["value"], l0s[e["name"]]] if e["name"] in l0s else None
                if point and point not in history.setdefault(e["arch"], []):
                    history[e["arch"]].append(point)
    variants = [v for v in args.variants if v in COEFFICIENT_VARIANTS]

    def close(v: str, t: float) -> bool:
        return any(abs(l0 / t - 1) <= args.l0_tolerance for _, l0 in history.get(v, []))

    for round_ in range(args.calibration_rounds):
        plan, seen = [], set()
        for v in variants:
            for t in args.l0:
                if close(v, t):
                    continue
                points = history.get(v, [])
                guesses = [predict(points, t, START[v])]
                if len(points) == 1:
                    guesses += [guesses[0] / 3, guesses[0] * 3]
                for c in guesses:
                    if any(abs(c / other - 1) < 0.02 for vv, other in seen if vv == v):
                        continue
                    seen.add((v, c))
                    plan.append(entry(v, t, args.seeds[0], c, d_sae) | {"name": f"{v}_c{c:.4g}_s{args.seeds[0]}"})
        if not plan:
            break
        l0s = saelens_train(args, plan, args.out / "saelens_calibration" / f"round{round_}_{int(time.time())}")
        for e in plan:
            history.setdefault(e["arch"], []).append([e["value"], l0s[e["name"]]])
        log_file.write_text(json.dumps(history, indent=1))
    result = {}
    for v in variants:
        for t in args.l0:
            points = history.get(v, [])
            result[(v, t)] = min(points, key=lambda p: abs(math.log(max(p[1], 1e-2) / t)))[0] if points else START[v]
    return result


def predict(points: list[list[float]], target: float, start: float) -> float:
    """The coefficient whose L0 should be `target`: log-log interpolation between the nearest points on either side
    of it, else a secant step from the two nearest (slope -1 from one point), at most a factor 10 beyond them."""
    if not points:
        return start
    pts = sorted((math.log(c), math.log(max(l0, 1e-2))) for c, l0 in points)
    y = math.log(target)
    above = [p for p in pts if p[1] >= y]  # L0 falls as the coefficient grows: these coefficients are smaller
    below = [p for p in pts if p[1] < y]
    if above and below:
        (x0, y0), (x1, y1) = max(above, key=lambda p: p[0]), min(below, key=lambda p: p[0])
        return math.exp(x0 + (y - y0) * (x1 - x0) / (y1 - y0)) if y1 != y0 else math.exp((x0 + x1) / 2)
    near = sorted(pts, key=lambda p: abs(p[1] - y))[:2]
    slope = -1.0
    if len(near) == 2 and near[0][0] != near[1][0]:
        s = (near[1][1] - near[0][1]) / (near[1][0] - near[0][0])
        if s < -0.05:
            slope = max(s, -5.0)
    step = (y - near[0][1]) / slope
    return math.exp(near[0][0] + max(-math.log(10), min(math.log(10), step)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="+",
                    default=["relu", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"])
    ap.add_argument("--l0", nargs="+", type=float, default=[8.0, 16.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-sae", type=int, default=None, help="latents (default: saelab's, 8 x d_in)")
    ap.add_argument("--calibration-rounds", type=int, default=4)
    ap.add_argument("--l0-tolerance", type=float, default=0.05)
    ap.add_argument("--saelab-extra", nargs="*", default=[], help="extra saelab-train overrides (saelab side only)")
    ap.add_argument("--skip-saelab", action="store_true")
    ap.add_argument("overrides", nargs="*", help="the data: data=synthetic data.synthetic.n_features=... etc.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = [*args.overrides]
    if not any(o.startswith("data=") for o in overrides):
        overrides.insert(0, "data=synthetic")
    if not any(o.startswith("data.seed=") for o in overrides):
        overrides.append("data.seed=0")  # one sample order for every job and both implementations
    overrides.append(f"optim.lr={args.lr}")
    py = str(ROOT / ".venv" / "bin" / "python")
    timings = {}

    started = time.time()
    data = args.out / "data"
    if not (data / "stream.f32").exists():
        run([py, str(HERE / "feed.py"), "meta", str(data), *overrides])
        with open(data / "stream.f32.part", "wb") as fh:
            run([py, str(HERE / "feed.py"), "stream", *overrides], stdout=fh)
        (data / "stream.f32.part").rename(data / "stream.f32")
    timings["data_s"] = time.time() - started
    import torch

    held = torch.load(data / "heldout.pt")
    d_sae = args.d_sae or 8 * int(held["d_in"])

    started = time.time()
    if not args.skip_saelab and not (args.out / "saelab" / "done").exists():
        sweep = [f"sae={','.join(args.variants)}", f"sae.target_l0={','.join(f'{t:g}' for t in args.l0)}",
                 f"seed={','.join(str(s) for s in args.seeds)}"]
        run([str(ROOT / ".venv" / "bin" / "saelab-train"), "-m", "hydra/launcher=fanout", "logger=csv",
             *overrides, f"sae.d_sae={d_sae}", *sweep, *args.saelab_extra, f"hydra.sweep.dir={args.out / 'saelab'}"])
        (args.out / "saelab" / "done").write_text("")
    timings["saelab_s"] = time.time() - started

    # SAELens: the variants whose L0 is k train at once, beside the calibration of the others (a second process).
    started = time.time()
    k_family = [v for v in args.variants if v not in COEFFICIENT_VARIANTS]
    k_dir = args.out / "saelens_k"
    k_run = None
    if k_family and not (k_dir / "plan.json").exists():
        plan = [entry(v, t, s, t, d_sae) for v in k_family for t in args.l0 for s in args.seeds]
        k_run = threading.Thread(target=lambda: (saelens_train(args, plan, k_dir),
                                                 (k_dir / "plan.json").write_text(json.dumps(plan, indent=1))))
        k_run.start()
    coefficients = calibrate(args, d_sae)
    timings["saelens_calibration_s"] = time.time() - started
    c_dir = args.out / "saelens_coefficient"
    c_family = [v for v in args.variants if v in COEFFICIENT_VARIANTS]
    if c_family and not (c_dir / "plan.json").exists():
        plan = [entry(v, t, s, coefficients[(v, t)], d_sae) for v in c_family for t in args.l0 for s in args.seeds]
        saelens_train(args, plan, c_dir)
        (c_dir / "plan.json").write_text(json.dumps(plan, indent=1))
    if k_run is not None:
        k_run.join()
        if not (k_dir / "plan.json").exists():
            raise SystemExit("SAELens training of " + ", ".join(k_family) + " failed (see above)")
    timings["saelens_s"] = time.time() - started

    started = time.time()
    run([py, str(HERE / "score.py"), str(args.out), *overrides])
    timings["score_s"] = time.time() - started
    previous = json.loads((args.out / "timings.json").read_text()) if (args.out / "timings.json").exists() else {}
    (args.out / "timings.json").write_text(json.dumps(previous | {k: round(v) for k, v in timings.items()}, indent=1))
    print(f"timings (s): {timings}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
