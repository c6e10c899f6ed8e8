"""`saelab-report <multirun dir>`: one table and Pareto plots for a (possibly unfinished) sweep.

Every job directory becomes one row (sweep.py: its overrides and metrics.json; jobs without metrics.json are
kept and marked `failed` or `incomplete`), grouped into series by the overrides that vary across jobs (sweep.py's
docstring), unless --group-by names the keys. The table is written as CSV (report.csv) and printed as markdown;
the plots (pareto.py) are PNGs next to it.

Seeds: when jobs differ only by `seed`, each setting also gets one row with the mean and standard deviation of
every metric over its seeds (report_seeds.csv, a "mean ± std" table: tables.py), and the Pareto plots are drawn
again from those means with one-standard-deviation error bars (pareto_seeds_*.png).

--compare KEY=A,B (compare.py): a claim's comparison of two values of one override at each setting of the others,
over seeds, with Welch's t-test and a verdict line per --metric (comparison.csv and a markdown section).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from saelab.metrics import registry
from saelab.reports.compare import compare, comparison_markdown, parse_compare
from saelab.reports.pareto import plot_pareto
from saelab.reports.sweep import collect
from saelab.reports.tables import aggregate_seeds, markdown_report, seeds_markdown

log = logging.getLogger("saelab.reports.report")


def wandb_online() -> bool:
    """A W&B run is active, or one could be started online (API key set and WANDB_MODE not offline)."""
    try:
        import wandb
    except ImportError:
        return False
    if wandb.run is not None:
        return True
    from saelab.run.loggers import wandb_api_key_configured

    mode = os.environ.get("WANDB_MODE", "").lower()
    return mode not in ("offline", "disabled", "dryrun") and wandb_api_key_configured()


def log_to_wandb(table: pd.DataFrame, plots: Sequence[Path], root: Path) -> None:
    """Best effort: a report run (or the active run) gets the table and the plots; failures only warn."""
    try:
        import wandb

        own_run = wandb.run is None
        run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT", "saelab"), job_type="report",
                                      name=f"report-{root.name}")
        run.log({"sweep_table": wandb.Table(dataframe=table.astype(str)),
                 **{f"pareto/{p.stem}": wandb.Image(str(p)) for p in plots}})
        if own_run:
            run.finish()
    except Exception as err:  # noqa: BLE001 - the report on disk is what matters
        log.warning("W&B logging skipped: %s", err)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saelab-report", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path, help="a Hydra sweep dir: outputs/multirun/<date>/<time>")
    parser.add_argument("--out", type=Path, help="where report.csv and the PNGs go (default: the sweep dir)")
    parser.add_argument("--x", default="l0", help="x-axis metric, minimised (default: l0)")
    parser.add_argument("--y", default="fvu", help="y-axis metric of the first plot (default: fvu)")
    parser.add_argument("--group-by", action="append", default=[], metavar="KEY",
                        help="series key(s): an override key (sae, sae.aux_loss) or a metrics.json field "
                             "(variant); repeat or comma-separate. Default: see the module docstring")
    parser.add_argument("--compare", metavar="KEY=A,B",
                        help="compare two values of one override at each setting of the others, over seeds "
                             "(Welch's t-test), e.g. sae.aux_loss=frozen_decoder,unfrozen_decoder")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME",
                        help="the metric(s) --compare tests (repeatable; default: fvu and l0)")
    parser.add_argument("--wandb", choices=("auto", "off"), default="auto",
                        help="auto: also log table + plots to W&B when it is online")
    args = parser.parse_args(argv)

    root = args.multirun_dir.expanduser().resolve()
    if not root.is_dir():
        print(f"error: multirun_dir {root}: not a directory", file=sys.stderr)
        return 2
    out = (args.out or root).expanduser().resolve()
    group_by = [k.strip() for spec in args.group_by for k in spec.split(",") if k.strip()]
    sweep = collect(root, group_by)
    table = sweep.table
    if table.empty:
        print(f"error: no job directories (with .hydra/overrides.yaml or metrics.json) under {root}",
              file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "report.csv"
    table.to_csv(csv, index=False)

    plots = []  # --y, then every metric the registry gives a plot of its own (the spliced ones)
    for y in dict.fromkeys([args.y, *registry.shown("pareto")]):
        if args.x in table and y in table and table.loc[table["status"] == "ok", y].notna().any():
            plots.append(plot_pareto(table, args.x, y, out / f"pareto_{args.x}_vs_{y}.png"))
    report = markdown_report(sweep, root, plots, csv)
    by_seed = aggregate_seeds(sweep)
    if by_seed is not None:  # settings run with several seeds: their means with error bars
        seeds_csv = out / "report_seeds.csv"
        by_seed.to_csv(seeds_csv, index=False)
        seed_plots = [plot_pareto(by_seed, args.x, y, out / f"pareto_seeds_{args.x}_vs_{y}.png")
                      for y in dict.fromkeys([args.y, *registry.shown("pareto")])
                      if args.x in by_seed and y in by_seed and by_seed[y].notna().any()]
        report += ("\n\n## Over seeds (mean ± std)\n\n" + seeds_markdown(by_seed, sweep.swept)
                   + f"\n\nCSV: {seeds_csv}\n" + "\n".join(f"Plot: {p}" for p in seed_plots))
        plots += seed_plots
    if args.compare:
        column, a, b = parse_compare(args.compare, sweep)
        result = compare(sweep, column, a, b, args.metric or ["fvu", "l0"])
        result.to_csv(out / "comparison.csv", index=False)
        report += (f"\n\n## {column}: {a} against {b} (mean ± std over seeds; Welch's t-test)\n\n"
                   + comparison_markdown(result, column, a, b) + f"\n\nCSV: {out / 'comparison.csv'}")
    print(report)
    if args.wandb == "auto" and wandb_online():
        log_to_wandb(table, plots, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
