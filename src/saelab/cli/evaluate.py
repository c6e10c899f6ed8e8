"""`saelab-eval <SAE dir> [overrides]`: evaluate any SAE saved in SAELens's format, whoever trained it.

The SAE (`cfg.json` + `sae_weights.safetensors`: standard, gated, jumprelu, topk and the transcoder layouts)
is measured with saelab's metrics on the held-out activations a saelab run with the same overrides uses (the
same config composition, the same activation cache), the spliced metrics included, and the result is a
`metrics.json` that `saelab-report` tables and plots beside saelab's own runs. The hook (and a transcoder's
target hook) come from the SAE's cfg.json unless `model.hook` / `model.target_hook` are given. Everything
that can be checked before the model loads is; a wrong width or hook fails right after, in one line.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from saelab.cli.checks import writable_problem
from saelab.data.sources import DataSource, build_source
from saelab.errors import ConfigError, bad_input_exit
from saelab.io import write_json
from saelab.run.compose import compose_run_config, with_config_dirs
from saelab.saes.saelens_format import ExportedSAE, layout_of, load_exported, read_sae_dir
from saelab.sites import Sites, column_scales

log = logging.getLogger("saelab.eval")


@dataclass
class Plan:
    sae_dir: Path
    sae_cfg: dict[str, Any]
    cfg: DictConfig  # seed, model, data, eval and paths of the composed train config, resolved
    out_dir: Path

    @functools.cached_property
    def sites(self) -> Sites:
        """The sites the export reads and writes, as the run's source names them (cfg.json's hooks by default)."""
        return build_source(self.cfg.data).sites(self.cfg.model)

    @property
    def hook(self) -> str:
        return self.sites.hook

    @property
    def target_hook(self) -> str | None:
        return self.sites.target_hook


class NormalisedView(nn.Module):
    """An exported SAE (raw activations in, raw output out) seen on saelab's normalised activations, so
    evaluate_sae measures it exactly as it measures a run: x -> export(C x) / C_out, latents / C."""

    def __init__(self, exported: ExportedSAE, scale: float, target_scale: float, site_scales: Tensor | None = None,
                 out_site_scales: Tensor | None = None):
        """`site_scales`: C_s for each input column of several sites side by side (`scale` is the first's);
        `out_site_scales` the output's (a cross-layer transcoder's writes; default: a crosscoder's, the same)."""
        super().__init__()
        self.exported, self.scale, self.target_scale = exported, float(scale), float(target_scale)
        self.d_sae = int(exported.cfg["d_sae"])
        out_site_scales = out_site_scales if out_site_scales is not None else site_scales
        self.columns = site_scales if site_scales is not None else torch.tensor(self.scale)
        self.out_columns = out_site_scales if out_site_scales is not None else torch.tensor(self.target_scale)
        self.W_dec = exported.W_dec / self.out_columns * self.scale

    def encode(self, x: Tensor) -> Tensor:
        return self.exported.encode(x * self.columns) / self.scale

    def output(self, x: Tensor, f: Tensor) -> Tensor:
        return self.exported.output(x * self.columns, f * self.scale) / self.out_columns


def make_plan(sae_dir: str, overrides: list[str], out: Path | None) -> Plan:
    """Check the SAE directory and compose the config; loads no model, writes nothing."""
    directory = Path(sae_dir).expanduser()
    sae_cfg = read_sae_dir(directory)
    architecture = str(sae_cfg["architecture"])
    layout_of(sae_cfg)  # a layout some variant declares (saes/saelens_layout.py), so ExportedSAE has its encoder
    for field, plain in (("normalize_activations", "none"), ("reshape_activations", "none"),
                         ("rescale_acts_by_decoder_norm", False)):  # run-time transforms saelab does not apply
        if sae_cfg.get(field, plain) not in (plain, None):
            raise ConfigError(field, sae_cfg[field], f"{plain!r}: saelab-eval runs the SAE on raw activations as saved")
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    metadata = sae_cfg.get("metadata") or {}
    implied = []
    for key, field in (("model.hook", "hook_names"), ("model.hook", "hook_name"), ("model.target_hook",
                       "hook_names_out"), ("model.target_hook", "hook_name_out"), ("model.diff_with", "diff_with")):
        value = sae_cfg.get(field, metadata.get(field))
        if value is not None and key not in given and not any(o.startswith(f"{key}=") for o in implied):
            implied.append(f"{key}=[{','.join(value)}]" if isinstance(value, list) else f"{key}={value}")
    cfg, run_dir = _compose([*implied, *overrides])
    source = build_source(cfg.data)
    if not source.needs_model and type(source).ground_truth is not DataSource.ground_truth:
        raise ConfigError("data", source.name, "a source without a world of true features (a text source, or "
                          "data=saelens_cache): saelab-eval measures reconstruction, not ground truth")
    if ("transcoder" in architecture) != (cfg.model.get("target_hook") is not None):
        raise ConfigError("model.target_hook", cfg.model.get("target_hook"),
                          "a hook for a transcoder (hook_name_out in its cfg.json) and null for an SAE")
    field = "--out" if out is not None or run_dir is None else "hydra.run.dir"
    out_dir = out or run_dir or Path(str(cfg.paths.output_dir)) / "eval" / time.strftime("%Y-%m-%d/%H-%M-%S")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(field, str(out_dir), "a new or empty directory")
    problem = writable_problem(out_dir.absolute())
    if problem:
        raise ConfigError(field, str(out_dir), f"a directory saelab can create and write to ({problem})")
    return Plan(directory, sae_cfg, cfg, out_dir)


def _compose(overrides: list[str]) -> tuple[DictConfig, Path | None]:
    """conf/train.yaml with the overrides, as saelab-train composes it, resolved and checked; and hydra.run.dir,
    resolved, where the overrides set it (saelab-eval then writes there, as saelab-train does; its default
    directory is its own, outputs/eval/<date>/<time>)."""
    from hydra.core.utils import setup_globals

    import saelab.data.model  # noqa: F401  registers the package_model_path resolver
    from saelab.run.schema import check_run_config

    setup_globals()  # the ${now:...} resolver a run directory may use
    cfg = compose_run_config(overrides, hydra_section=True)
    check_run_config(cfg)
    given = any(o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in overrides)
    run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).expanduser() if given else None
    # The sections evaluation reads, resolved (the rest may name Hydra's run directory, which has no run here).
    return OmegaConf.create({"seed": cfg.seed, **{k: OmegaConf.to_container(cfg[k], resolve=True)
                                                 for k in ("model", "data", "eval", "paths")}}), run_dir


def evaluate(plan: Plan) -> dict[str, Any]:
    """The SAE's metrics on the run's held-out activations (the run pipeline's stream and evaluation: run/stream.py,
    run/evaluation.py), written to <out>/metrics.json."""
    from saelab.run.evaluation import held_out_metrics, raw_splice, spliced, spliced_hooks
    from saelab.run.stream import Reader, open_one_stream

    started, cfg, sites = time.time(), plan.cfg, plan.sites
    target = sites.target_hook
    d_in = int(plan.sae_cfg["d_in"])
    if d_in % len(sites.reads):
        raise ConfigError("model.hook", list(sites.reads), f"sites that split the export's d_in ({d_in}) evenly")
    exported = load_exported(plan.sae_dir)
    reader = Reader(sites.hook, target, d_in // len(sites.reads), sites=sites)
    stream = open_one_stream(cfg, reader, int(cfg.data.normalize_tokens))
    scales = stream.datamodule.scales
    scale = scales[plan.hook]
    n_sites, d_out = len(sites.reads), int(plan.sae_cfg.get("d_out", d_in))
    site_scales = column_scales([scales[h] for h in sites.reads], d_in // n_sites) if sites.several else None
    out_scales = column_scales([scales[h] for h in sites.writes], d_out // n_sites) if sites.several else None
    view = NormalisedView(exported, scale, scales[target] if target else scale, site_scales, out_scales)
    metrics, _ = held_out_metrics(view, stream, sites, int(cfg.eval.batch_size))

    def predict(x: Tensor) -> Tensor:
        with torch.no_grad():
            return exported(x.float())

    causal = "topk" not in str(plan.sae_cfg["architecture"])  # TopK selects among every layer's latents
    splice = {0: (spliced_hooks(sites), raw_splice(predict, sites, causal))}
    metrics |= spliced(stream, splice, int(cfg.eval.spliced_windows or 0), int(cfg.data.model_batch_size)).get(0, {})
    architecture = str(plan.sae_cfg["architecture"])
    metadata = plan.sae_cfg.get("metadata") or {}
    result = {
        **metrics,
        "variant": f"eval:{architecture}",
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": int(plan.sae_cfg["d_sae"]),
        "hook_name": plan.hook,
        **({"sites": list(sites.scaled)} if sites.several else {}),
        **({"target_hook": target, "d_out": int(plan.sae_cfg.get("d_out", d_in))} if target else {}),
        "evaluated": str(plan.sae_dir.resolve()),
        "trained_by": metadata.get("trained_by", "unknown"),
        "normalization_scale": float(scale),
        "wall_time_s": time.time() - started,
    }
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan.out_dir / "metrics.json", result)
    log.info("held-out: L0 %.1f, FVU %.3f -> %s", metrics["l0"], metrics["fvu"], plan.out_dir / "metrics.json")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saelab-eval", description=__doc__.splitlines()[0])
    parser.add_argument("sae_dir", help="a directory with cfg.json + sae_weights.safetensors (SAELens's format)")
    parser.add_argument("overrides", nargs="*", help="saelab-train overrides: model=..., data=..., eval.tokens=...")
    parser.add_argument("--config-dir", "-cd", type=Path, action="append", default=[],
                        help="a directory of your own configs (experiment/, model/, ...), as for saelab-train")
    parser.add_argument("--out", type=Path, help="where metrics.json goes (default: hydra.run.dir if given, else "
                        "outputs/eval/<date>/<time>)")
    args = parser.parse_intermixed_args(argv)  # options may come between the overrides
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        plan = make_plan(args.sae_dir, with_config_dirs(args.overrides, args.config_dir), args.out)
        result = evaluate(plan)
    except Exception as err:
        return bad_input_exit(err)
    print(f"{plan.out_dir / 'metrics.json'}: L0 {result['l0']:.2f}, FVU {result['fvu']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
