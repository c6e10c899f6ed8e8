"""A SynthSAEBench world in SAELens's on-disk format (`SyntheticModel.save` / `load_from_disk`), one directory:

- synthetic_model_config.json: the SyntheticModelConfig (num_features, hidden_dim, firing_probability,
  hierarchy, orthogonalization, correlation, std_firing_magnitudes, mean_firing_magnitudes, bias, dtype, seed);
- synthetic_model.safetensors: feature_vectors [N, d], bias [d], firing_probabilities [N] (the sampling
  probabilities, after compensation), and with a copula correlation_factor [N, r] and correlation_diag [N];
- hierarchy.json (when there is a hierarchy): {"roots": [node, ...]}, each node {feature_index,
  mutually_exclusive_children, scale_children_by_parent, feature_id, children}.

The magnitudes are not stored: as SAELens does on load, they are drawn again from the config (std with seed + 1,
mean with seed + 2). Nothing is fetched: a world from the Hub (e.g. the paper's) is downloaded by the user first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from saelab.data.synthsaebench import magnitudes
from saelab.data.synthsaebench.copula import Copula
from saelab.data.synthsaebench.hierarchy import Hierarchy
from saelab.data.synthsaebench.world import SynthSAEBenchWorld

CONFIG, WEIGHTS, HIERARCHY = "synthetic_model_config.json", "synthetic_model.safetensors", "hierarchy.json"


def read_config(path: str | Path) -> dict[str, Any]:
    """The synthetic_model_config.json of a world directory (FileNotFoundError naming what is missing)."""
    file = Path(path).expanduser() / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a SAELens synthetic model directory holds {CONFIG}, {WEIGHTS} "
                                f"and, with a hierarchy, {HIERARCHY} (download the world first)")
    return json.loads(file.read_text())


def load_world(path: str | Path) -> SynthSAEBenchWorld:
    """The world saved in `path` by SAELens (or by save_world)."""
    path = Path(path).expanduser()
    config = read_config(path)
    if config.get("dtype", "float32") != "float32":
        raise ValueError(f"{path / CONFIG}: dtype {config['dtype']!r}; only float32 worlds are supported")
    weights = load_file(str(path / WEIGHTS))
    n, seed = int(config["num_features"]), config.get("seed")
    hierarchy = None
    if (path / HIERARCHY).is_file():
        roots = json.loads((path / HIERARCHY).read_text())["roots"]
        hierarchy = Hierarchy.from_roots(roots, n) if roots else None
    copula = None
    if "correlation_factor" in weights:
        copula = Copula(weights["correlation_factor"].float(), weights["correlation_diag"].float())
    std = magnitudes.from_saelens(config.get("std_firing_magnitudes", 0.0), n,
                                  None if seed is None else seed + magnitudes.STD_SEED_OFFSET)
    mean = magnitudes.from_saelens(config.get("mean_firing_magnitudes", 1.0), n,
                                   None if seed is None else seed + magnitudes.MEAN_SEED_OFFSET)
    if hierarchy is not None and hierarchy.rescale.any():
        scaled_parents = hierarchy.parent[hierarchy.rescale & (hierarchy.parent >= 0)]
        if not (mean[scaled_parents] > 0).all():
            raise ValueError(f"{path}: a parent that scales its children has mean magnitude <= 0")
    return SynthSAEBenchWorld(weights["feature_vectors"], weights["bias"], weights["firing_probabilities"], mean,
                              std, copula, hierarchy, config, 0 if seed is None else int(seed))


def save_world(world: SynthSAEBenchWorld, path: str | Path) -> None:
    """Write `world` in SAELens's format, loadable by SyntheticModel.load_from_disk (and load_world)."""
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(world.config, indent=2))
    weights = {"feature_vectors": world.dictionary.contiguous(), "bias": world.bias.contiguous(),
               "firing_probabilities": world.sampling_probability.contiguous()}
    if world.copula is not None:
        weights |= {"correlation_factor": world.copula.factor.contiguous(),
                    "correlation_diag": world.copula.diag.contiguous()}
    save_file(weights, str(path / WEIGHTS))
    if world.hierarchy is not None:
        (path / HIERARCHY).write_text(json.dumps({"roots": world.hierarchy.roots}, indent=2))
