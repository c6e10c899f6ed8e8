"""Make the SynthSAEBench world that tests/test_synthsaebench.py checks saelab's loader, builder and sampler
against: a small world built and saved by SAELens itself (`SyntheticModel.save`, its on-disk format), with
statistics of SAELens's own samples kept beside it (saelens_stats.safetensors).

Run once, with a Python that has sae-lens installed (never saelab's environment; scripts/saelens_compat/run.sh
makes one at $SAELENS_VENV), from the project root:
    $SAELENS_VENV/bin/python scripts/saelens_compat/make_synthsaebench_fixture.py tests/fixtures/synthsaebench_small

The world is the paper's 16k recipe shrunk: 1,024 features in 32 dimensions, a hierarchy of 8 roots x branching 4
x depth 3 (680 features), exclusive siblings, compensated probabilities, children scaled by their parent; a
rank-8 copula with factor std 0.25 (stronger than the paper's 0.1, so co-firing differs visibly from independence).
Statistics of SAMPLES SAELens samples (feature activations a [n, N], x = a D + b), all sums over samples:
fire_count [N]; act_power_k [N] = sum a^k, k = 1..4; l0_sum, l0_sq_sum; sibling_conflicts (a sample and an
exclusive group with two members active); gating_violations (a child active with its parent silent); pairs [P, 2]
and pair_count [P] (both active); x_sum [d], x_sq_sum [d].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import sae_lens
import torch
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from safetensors.torch import save_file

SAMPLES, BATCH, SAMPLE_SEED = 100_000, 10_000, 1234
CONFIG = SyntheticModelConfig(
    num_features=1024,
    hidden_dim=32,
    firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
    hierarchy=HierarchyConfig(total_root_nodes=8, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
                              mutually_exclusive_min_depth=0, compensate_probabilities=True,
                              scale_children_by_parent=True),
    orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
    correlation=LowRankCorrelationConfig(rank=8, correlation_scale=0.25),
    mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
    std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
    bias=0.5,
    seed=7,
)


def tree(model: SyntheticModel) -> tuple[torch.Tensor, list[list[int]]]:
    """(parent [N], -1 for none; the exclusive sibling groups) read from SAELens's hierarchy."""
    parent = torch.full((model.cfg.num_features,), -1, dtype=torch.long)
    groups: list[list[int]] = []
    stack = list(model.hierarchy.roots)
    while stack:
        node = stack.pop()
        for child in node.children:
            parent[child.feature_index] = node.feature_index
        if node.mutually_exclusive_children:
            groups.append([c.feature_index for c in node.children])
        stack += list(node.children)
    return parent, groups


def chosen_pairs(model: SyntheticModel, parent: torch.Tensor) -> torch.Tensor:
    """Pairs whose co-firing is compared: the 60 most correlated (by the copula) pairs of features without a
    parent firing more than 2% of the time, the first 60 parent-child pairs, 30 grandparent-grandchild pairs, 30
    fixed random pairs."""
    factor = model.correlation_matrix.correlation_factor
    free = (parent < 0) & (model.activation_generator.firing_probabilities > 0.02)
    frequent = free.nonzero().squeeze(1)
    corr = (factor[frequent] @ factor[frequent].T).triu(1).abs()
    top = corr.flatten().topk(60).indices
    pairs = [(int(frequent[i // len(frequent)]), int(frequent[i % len(frequent)])) for i in top.tolist()]
    children = (parent >= 0).nonzero().squeeze(1)
    pairs += [(int(parent[c]), int(c)) for c in children[:60]]
    grand = children[(parent[children] >= 0) & (parent[parent[children].clamp(min=0)] >= 0)]
    pairs += [(int(parent[parent[c]]), int(c)) for c in grand[::max(1, len(grand) // 30)][:30]]
    g = torch.Generator().manual_seed(0)
    pairs += [tuple(torch.randperm(model.cfg.num_features, generator=g)[:2].tolist()) for _ in range(30)]
    return torch.tensor(pairs, dtype=torch.long)


def statistics(model: SyntheticModel, parent: torch.Tensor, groups: list[list[int]], pairs: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    n, d = model.cfg.num_features, model.cfg.hidden_dim
    out = {"fire_count": torch.zeros(n, dtype=torch.long), "pair_count": torch.zeros(len(pairs), dtype=torch.long),
           "x_sum": torch.zeros(d, dtype=torch.float64), "x_sq_sum": torch.zeros(d, dtype=torch.float64)}
    out |= {f"act_power_{k}": torch.zeros(n, dtype=torch.float64) for k in range(1, 5)}
    l0_sum = l0_sq_sum = conflicts = violations = 0
    has_parent = parent >= 0
    table = torch.tensor(groups, dtype=torch.long)
    torch.manual_seed(SAMPLE_SEED)  # SAELens samples from the global generator
    for _ in range(SAMPLES // BATCH):
        acts = model.activation_generator.sample(BATCH)
        x = model.feature_dict(acts)
        fired = acts > 0
        out["fire_count"] += fired.sum(0)
        for k in range(1, 5):
            out[f"act_power_{k}"] += (acts.double() ** k).sum(0)
        l0 = fired.sum(1)
        l0_sum, l0_sq_sum = l0_sum + int(l0.sum()), l0_sq_sum + int((l0**2).sum())
        conflicts += int((fired[:, table].sum(2) > 1).sum())
        violations += int((fired[:, has_parent] & ~fired[:, parent[has_parent]]).sum())
        out["pair_count"] += (fired[:, pairs[:, 0]] & fired[:, pairs[:, 1]]).sum(0)
        out["x_sum"] += x.double().sum(0)
        out["x_sq_sum"] += (x.double() ** 2).sum(0)
    return out | {"pairs": pairs, "samples": torch.tensor(SAMPLES), "l0_sum": torch.tensor(l0_sum),
                  "l0_sq_sum": torch.tensor(l0_sq_sum), "sibling_conflicts": torch.tensor(conflicts),
                  "gating_violations": torch.tensor(violations)}


def main(out: Path) -> None:
    model = SyntheticModel(CONFIG)
    model.save(out)
    parent, groups = tree(model)
    stats = statistics(model, parent, groups, chosen_pairs(model, parent))
    save_file({k: v.contiguous() for k, v in stats.items()}, str(out / "saelens_stats.safetensors"))
    (out / "made_by.json").write_text(json.dumps({"sae_lens": sae_lens.__version__, "torch": torch.__version__,
                                                  "samples": SAMPLES, "sample_seed": SAMPLE_SEED}, indent=2) + "\n")
    l0 = stats["l0_sum"].item() / SAMPLES
    print(f"saved to {out}: mean L0 {l0:.3f}, sibling conflicts {stats['sibling_conflicts'].item()}, "
          f"gating violations {stats['gating_violations'].item()}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
