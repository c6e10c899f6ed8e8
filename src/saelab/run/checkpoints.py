"""Checkpoints of a group, one file per job: Lightning saves one checkpoint for the whole group (SAEModule with
its members, one Adam with a parameter group per member, one LambdaLR with a schedule per member); this
CheckpointIO splits it so that every job's `checkpoints/` holds a checkpoint of its own SAE alone, the same
file a run of that job by itself writes, and merges the jobs' files back into a group checkpoint to resume.

A job's file is a group-of-one checkpoint: `state_dict` keys without the `members.<i>.` prefix, the optimiser
state of its parameter group alone, its schedule alone, and the loops, data position and callback state the
group shares (paths in the callback state rewritten to the job's own checkpoint directory).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)
_PREFIX = "members.{}."


def split_checkpoint(checkpoint: dict[str, Any], index: int, rewrite: Callable[[str], str] = str
                     ) -> dict[str, Any]:
    """Member `index`'s own checkpoint from a group checkpoint; `rewrite` maps the group's paths to its own."""
    prefix = _PREFIX.format(index)
    out = dict(checkpoint)
    out["state_dict"] = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    out["optimizer_states"] = [_optimizer_group(state, index) for state in checkpoint.get("optimizer_states", [])]
    out["lr_schedulers"] = [_schedule_slice(state, index) for state in checkpoint.get("lr_schedulers", [])]
    if "callbacks" in checkpoint:
        out["callbacks"] = _map_strings(checkpoint["callbacks"], rewrite)
    return out


def merge_checkpoints(members: Sequence[dict[str, Any]], rewrites: Sequence[Callable[[str], str]]
                      ) -> dict[str, Any]:
    """The group checkpoint of several job checkpoints saved at the same step (inverse of split)."""
    steps = {int(m["global_step"]) for m in members}
    if len(steps) != 1:
        raise ValueError(f"the jobs' checkpoints are at different steps ({sorted(steps)}); resume them apart")
    out = dict(members[0])
    out["state_dict"] = {f"{_PREFIX.format(i)}{k}": v
                         for i, m in enumerate(members) for k, v in m["state_dict"].items()}
    n_opt = len(members[0].get("optimizer_states", []))
    out["optimizer_states"] = [_join_optimizer([m["optimizer_states"][j] for m in members]) for j in range(n_opt)]
    n_sched = len(members[0].get("lr_schedulers", []))
    out["lr_schedulers"] = [_join_schedules([m["lr_schedulers"][j] for m in members]) for j in range(n_sched)]
    if "callbacks" in members[0]:
        out["callbacks"] = _map_strings(members[0]["callbacks"], rewrites[0])
    return out


def _optimizer_group(state: dict[str, Any], index: int) -> dict[str, Any]:
    """The optimiser state of parameter group `index`, its parameters renumbered from 0."""
    group = dict(state["param_groups"][index])
    ids = list(group["params"])
    group["params"] = list(range(len(ids)))
    return {"state": {new: state["state"][old] for new, old in enumerate(ids) if old in state["state"]},
            "param_groups": [group]}


def _join_optimizer(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"state": {}, "param_groups": []}
    offset = 0
    for state in states:
        for group in state["param_groups"]:
            ids = list(group["params"])
            merged["param_groups"].append(dict(group) | {"params": [offset + i for i in ids]})
            merged["state"].update({offset + i: v for i, v in state["state"].items()})
            offset += len(ids)
    return merged


def _schedule_slice(state: dict[str, Any], index: int) -> dict[str, Any]:
    """A per-group scheduler state (LambdaLR: lists with one entry per parameter group) for one group."""
    n = len(state.get("base_lrs", []))
    return {k: (v[index : index + 1] if isinstance(v, list) and len(v) == n else v) for k, v in state.items()}


def _join_schedules(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(states[0].get("base_lrs", []))
    return {k: ([x for s in states for x in s[k]] if isinstance(v, list) and len(v) == n else v)
            for k, v in states[0].items()}


def _map_strings(value: Any, rewrite: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return rewrite(value)
    if isinstance(value, dict):
        return {_map_strings(k, rewrite): _map_strings(v, rewrite) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, rewrite) for v in value]
    return value


def _prefix_rewrite(old: Path, new: Path) -> Callable[[str], str]:
    old_s, new_s = str(old), str(new)
    return lambda s: new_s + s[len(old_s):] if s == old_s or s.startswith(old_s + "/") else s


class GroupCheckpointIO(TorchCheckpointIO):
    """Writes the group's checkpoint as one file per member (job) and reads it back from those files.

    `checkpoint_dirs[i]` is member i's checkpoint directory; the group's own path (what ModelCheckpoint asks
    for, under `checkpoint_dirs[0]`) maps to the same relative path in each. `alive()` says which members
    still train: a stopped member's files are left as they were. `resume_from[i]` is the file member i
    resumes from (all at one step); loading any path then returns their merge.
    """

    def __init__(self, checkpoint_dirs: Sequence[Path], alive: Callable[[], list[bool]],
                 resume_from: Sequence[Path] | None = None):
        super().__init__()
        self.dirs = [Path(d).resolve() for d in checkpoint_dirs]
        self.alive, self.resume_from = alive, resume_from

    def _member_paths(self, path: Path) -> list[Path]:
        path = Path(path).resolve()
        try:
            rel = path.relative_to(self.dirs[0])
        except ValueError:  # a path outside the group's directory (e.g. trainer.save_checkpoint("x.ckpt"))
            return [path] + [d / path.name for d in self.dirs[1:]]
        return [d / rel for d in self.dirs]

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        for index, (target, alive) in enumerate(zip(self._member_paths(path), self.alive(), strict=True)):
            if alive:
                own = split_checkpoint(checkpoint, index, _prefix_rewrite(self.dirs[0], self.dirs[index]))
                super().save_checkpoint(own, target)

    def remove_checkpoint(self, path) -> None:
        for target, alive in zip(self._member_paths(path), self.alive(), strict=True):
            if alive and target.is_file():
                target.unlink()

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        sources = self.resume_from or [path]
        members = [super(GroupCheckpointIO, self).load_checkpoint(p, weights_only=weights_only) for p in sources]
        rewrites = [_prefix_rewrite(Path(p).resolve().parent, self.dirs[0]) for p in sources]
        return merge_checkpoints(members, rewrites)


def expect_own_checkpoints(directory: Path) -> None:
    """A run resuming in its own directory finds its checkpoints there, as it should: Lightning's warning that
    the checkpoint directory "exists and is not empty" (meant for two runs mixing their files) is filtered for
    this directory alone, by its exact message; any other directory still warns."""
    dirpath = os.path.realpath(Path(directory).expanduser())  # as ModelCheckpoint names it
    warnings.filterwarnings("ignore", message=re.escape(f"Checkpoint directory {dirpath} exists and is not empty.")
                            + "$")
