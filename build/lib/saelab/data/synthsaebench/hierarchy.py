"""The feature hierarchy of a SynthSAEBench world: trees over feature ids, in SAELens's hierarchy.json form (one
dict per node: feature_index, mutually_exclusive_children, scale_children_by_parent, feature_id, children),
flattened into the index tensors the sampler uses.

Semantics (SAELens `sae_lens.synthetic.hierarchy`), applied to a sample's activations a level at a time, from the
roots (level 0) down; at level L:

1. gate: each feature f at level L with parent p keeps its value only if a_p > 0; if p's node has
   scale_children_by_parent, a_f <- a_f * a_p / mean_p (mean_p: p's mean magnitude), else a_f is kept as is;
2. mutual exclusion: for each node at level L whose children are mutually exclusive and whose feature is active
   (a node without a feature counts as active), if more than one child has a_c > 0, one of those is kept,
   uniformly at random, and the others are set to 0. Children are gated at level L + 1, after this, so a child
   removed here silences its whole subtree.

Probability compensation (SAELens's `compensate_probabilities`): with base probabilities p, feature f with parent
node of base probability P (1 for a root) samples with q_f = min(1, p_f / P * c_f), where c_f = 1 + (sum of its
mutually exclusive siblings' base probabilities) / P (1 outside such a group): given the parent, f then fires at
about p_f / P and is about as often left standing by the exclusion, so its marginal comes back near p_f.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Node = dict[str, Any]


def leaf(feature: int) -> Node:
    return {"feature_index": feature, "mutually_exclusive_children": False, "scale_children_by_parent": False,
            "feature_id": None, "children": []}


def build_forest(n_features: int, roots: int, branching: int, depth: int) -> list[Node]:
    """`roots` trees laid out breadth-first by index: roots 0 .. roots - 1, then every level's children in order of
    their parents (root r's children at level 1 are roots + b r .. roots + b r + b - 1), down to `depth` levels
    below the roots, stopping when the N features run out. Every node above the leaves scales its children by
    its activation over its mean, and its children (when there are at least two) are mutually exclusive."""
    if roots == 0:
        return []
    forest = [leaf(f) for f in range(min(roots, n_features))]
    next_feature, level, parents = len(forest), 0, list(forest)
    for node in forest:
        node["scale_children_by_parent"] = True
    while parents and level < depth:
        children_level = []
        for parent in parents:
            count = min(branching, n_features - next_feature)
            parent["children"] = [leaf(next_feature + i) for i in range(count)]
            next_feature += count
            children_level += parent["children"]
        level += 1
        if level < depth:  # these children are parents in turn
            for child in children_level:
                child["scale_children_by_parent"] = True
        parents = children_level
    stack = list(forest)
    while stack:
        node = stack.pop()
        node["mutually_exclusive_children"] = len(node["children"]) >= 2
        stack += node["children"]
    return forest


@dataclass(frozen=True)
class Hierarchy:
    """A forest (SAELens's hierarchy.json roots) and its flat form for N features."""

    roots: list[Node]
    parent: Tensor  # [N] long: the feature of the nearest ancestor node with one, -1 for roots and free features
    level: Tensor  # [N] long: depth of the feature's node (roots 0), -1 outside the hierarchy
    rescale: Tensor  # [N] bool: the feature's value is scaled by its parent's activation over its mean
    groups: Tensor  # [G, B] long: the features of each mutually exclusive sibling group, padded with -1
    group_parent: Tensor  # [G] long: the feature of the group's node, -1 for a node without one (always active)
    group_level: Tensor  # [G] long: the level of the group's node

    @classmethod
    def from_roots(cls, roots: Sequence[Node], n_features: int) -> Hierarchy:
        """Flatten a forest breadth-first (as SAELens does): each node's level, its feature's effective parent
        and rescaling, and the mutually exclusive groups with the level they are applied at."""
        parent = torch.full((n_features,), -1, dtype=torch.long)
        level = torch.full((n_features,), -1, dtype=torch.long)
        rescale = torch.zeros(n_features, dtype=torch.bool)
        groups: list[tuple[int, int, list[int]]] = []
        queue: deque[tuple[Node, int, int, bool]] = deque((r, -1, 0, False) for r in roots)
        while queue:
            node, eff_parent, depth, parent_rescales = queue.popleft()
            feature = node.get("feature_index")
            children = list(node.get("children") or [])
            if feature is not None:
                if not 0 <= feature < n_features or level[feature] >= 0:
                    raise ValueError(f"hierarchy: feature {feature} is out of range or appears twice")
                parent[feature], level[feature], rescale[feature] = eff_parent, depth, parent_rescales
            child_features = [c["feature_index"] for c in children if c.get("feature_index") is not None]
            if node.get("mutually_exclusive_children") and len(child_features) >= 2:
                groups.append((depth, -1 if feature is None else feature, child_features))
            below = feature if feature is not None else eff_parent
            for child in children:
                queue.append((child, below, depth + 1, bool(node.get("scale_children_by_parent"))))
        width = max((len(g[2]) for g in groups), default=0)
        table = torch.full((len(groups), width), -1, dtype=torch.long)
        for i, (_, _, members) in enumerate(groups):
            table[i, : len(members)] = torch.tensor(members)
        return cls(list(roots), parent, level, rescale, table,
                   torch.tensor([g[1] for g in groups], dtype=torch.long),
                   torch.tensor([g[0] for g in groups], dtype=torch.long))

    @property
    def n_levels(self) -> int:
        """Levels to process: those of the features and those of the groups' nodes."""
        return int(max(self.level.max().item() if len(self.level) else -1,
                       self.group_level.max().item() if len(self.group_level) else -1)) + 1

    def compensated(self, base: Tensor) -> Tensor:
        """q = min(1, base * correction) (module docstring), computed on the tree in base's dtype, with SAELens's
        order of operations (so a world built here samples with SAELens's probabilities, to the last bit)."""
        factor = torch.ones_like(base)

        def visit(node: Node, parent_p: float) -> None:
            feature = node.get("feature_index")
            if feature is not None:
                if parent_p > 0:
                    factor[feature] = 1.0 / parent_p
                own = base[feature].item()
            else:
                own = parent_p
            children = list(node.get("children") or [])
            for child in children:
                visit(child, own)
            members = [(c["feature_index"], base[c["feature_index"]].item()) for c in children
                       if c.get("feature_index") is not None]
            if node.get("mutually_exclusive_children") and len(members) >= 2 and own > 0:
                total = sum(p for _, p in members)
                for m, p in members:
                    factor[m] *= 1.0 + max(0.0, total - p) / own

        for root in self.roots:
            visit(root, 1.0)
        return (base * factor).clamp(max=1.0)
