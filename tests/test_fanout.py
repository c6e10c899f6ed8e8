"""hydra/launcher=fanout: the jobs of a multirun that share an activation source train in one process.

The end-to-end tests run the real CLI in subprocesses on the tiny model and compare a fanned-out sweep with
the same sweep run by Hydra's basic launcher (one job after another, each a group of one): with
trainer.deterministic=true they must end with exactly the same weights, checkpoints, exports and metrics.
Model forward passes are counted by benchmarks/sweep_economy.py's child mode, which wraps the one function
every activation forward goes through.
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from benchmarks.sweep_economy import COUNTS_TAG  # the line its child mode prints the forward counts on
from saelab.reports.sweep import collect
from saelab.run.checkpoints import merge_checkpoints, split_checkpoint
from saelab.run.grouping import group_key, make_groups, shared_config, split_by_limits
from saelab.run.job import Job
from saelab.run.member import SAEMember
from saelab.run.module import SAEModule
from saelab.saes.base import build_sae
from tests.conftest import optim_config, run_cli, run_module, run_until_then_kill, tiny_overrides


def _base(model_dir: Path, corpus_dir: Path, out: Path, cache: Path, data_cache: str) -> list[str]:
    # data.prefetch_batches=0: the forward counts compared below are then exact (a read-ahead may run 0..depth more)
    return [*tiny_overrides(model_dir, corpus_dir, out), f"paths.cache_dir={cache}", f"data.cache={data_cache}",
            "data.prefetch_batches=0",
            "data.train_tokens=12800", "trainer.deterministic=true", "trainer.log_every_n_steps=5",
            "callbacks.model_checkpoint.every_n_train_steps=20", "eval.spliced_windows=8"]


def _sweep(args: list[str], launcher: str | None, timeout: int = 600) -> tuple[Path, dict]:
    """Run `saelab-train -m args` (counting forward passes); return the sweep directory and the counts."""
    cli_args = ["--child", "--", "-m", *args, *([f"hydra/launcher={launcher}"] if launcher else [])]
    result = run_module("benchmarks.sweep_economy", cli_args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    counts = next(json.loads(line[len(COUNTS_TAG):]) for line in result.stderr.splitlines()
                  if line.startswith(COUNTS_TAG))
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("paths.output_dir=")))
    (sweep_dir,) = (out / "multirun").glob("*/*")
    return sweep_dir, counts


def _assert_same_jobs(a: Path, b: Path, jobs: list[str]) -> None:
    for job in jobs:
        for name in ("sae/sae_weights.safetensors",):
            x, y = load_file(a / job / name), load_file(b / job / name)
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]), (job, key)
        assert json.loads((a / job / "sae" / "cfg.json").read_text()) == json.loads(
            (b / job / "sae" / "cfg.json").read_text())
        ma, mb = (json.loads((d / job / "metrics.json").read_text()) for d in (a, b))
        ma.pop("wall_time_s"), mb.pop("wall_time_s")
        for m in (ma, mb):  # the sweeps differ in their output directory and launcher only
            m["overrides"] = [o for o in m["overrides"] if not o.startswith(
                ("paths.output_dir", "paths.cache_dir", "hydra/launcher", "hydra.sweep.dir", "ckpt_path"))]
        assert ma == mb, job
        ca, cb = (torch.load(d / job / "checkpoints" / "last.ckpt", weights_only=True) for d in (a, b))
        assert ca["state_dict"].keys() == cb["state_dict"].keys()
        assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"]), job
        sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
        assert all(torch.equal(sa[i][m], sb[i][m]) for i in sa for m in ("exp_avg", "exp_avg_sq")), job
        assert (a / job / ".hydra" / "config.yaml").is_file() and (a / job / "train.log").is_file()
        assert (a / job / "csv" / "metrics.csv").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("data_cache", ["auto", "off"])
def test_fanout_equals_separate_jobs(data_cache, tiny_model_dir, tiny_corpus_dir, tmp_path):
    """Two variants trained in one group end exactly as when run one after another, from the cache and
    streamed; the group runs the model once per batch for both (streamed: as many forwards as one job)."""
    cache = tmp_path / "cache"
    args = ["sae=relu,topk"]
    separate, basic_counts = _sweep([*_base(tiny_model_dir, tiny_corpus_dir, tmp_path / "a", cache, data_cache),
                                     *args], None)
    grouped, fanout_counts = _sweep([*_base(tiny_model_dir, tiny_corpus_dir, tmp_path / "b", cache, data_cache),
                                     *args], "fanout")
    _assert_same_jobs(separate, grouped, ["0", "1"])
    if data_cache == "off":  # one job's forward passes for the whole group; the basic launcher runs two jobs'
        per_job = basic_counts["jobs"]
        assert len(per_job) == 2 and per_job[0]["calls"] == per_job[1]["calls"] > 0
        assert fanout_counts["calls"] == per_job[0]["calls"]
        assert fanout_counts["windows"] == per_job[0]["windows"]
    else:  # the basic sweep's first job built the cache; after that nobody runs the model for activations
        assert basic_counts["jobs"][0]["calls"] > 0 == basic_counts["jobs"][1]["calls"] == fanout_counts["calls"]


@pytest.mark.slow
@pytest.mark.parametrize("data_cache", ["off", "auto"])
def test_fanout_on_two_hooks_equals_separate_jobs(data_cache, tiny_model_dir, tiny_corpus_dir, tmp_path):
    """Jobs on two hooks of one model share one forward pass per batch, streamed or filling both hooks' caches
    (from empty caches: the basic launcher's jobs build one each), and match their own runs."""
    args = ["model.hook=blocks.0.hook_out,blocks.1.hook_out"]
    separate, basic_counts = _sweep([*_base(tiny_model_dir, tiny_corpus_dir, tmp_path / "a", tmp_path / "cache_a",
                                            data_cache), *args], None)
    grouped, fanout_counts = _sweep([*_base(tiny_model_dir, tiny_corpus_dir, tmp_path / "b", tmp_path / "cache_b",
                                            data_cache), *args], "fanout")
    _assert_same_jobs(separate, grouped, ["0", "1"])
    assert json.loads((grouped / "1" / "sae" / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_out"
    assert fanout_counts["calls"] == basic_counts["jobs"][1]["calls"]  # the deeper hook's job alone


@pytest.mark.slow
def test_a_failing_job_fails_alone(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """A learning rate of 1e38 makes job 1's loss non-finite within a few steps: it stops with its error.txt
    (nan_policy=stop), job 0 completes, and saelab-report lists both."""
    out = tmp_path / "out"
    sweep_dir, _ = _sweep([*_base(tiny_model_dir, tiny_corpus_dir, out, tmp_path / "cache", "auto"),
                           "optim.lr=2e-3,1e38"], "fanout")
    assert (sweep_dir / "0" / "metrics.json").is_file() and not (sweep_dir / "0" / "error.txt").exists()
    error = (sweep_dir / "1" / "error.txt").read_text()
    assert "FloatingPointError" in error and "non-finite" in error
    assert not (sweep_dir / "1" / "metrics.json").exists() and not (sweep_dir / "1" / "sae").exists()
    for path in (sweep_dir / "1" / "checkpoints").glob("*.ckpt"):  # only finite weights were ever written
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    table = collect(sweep_dir).table.set_index("job")
    assert table.loc["0", "status"] == "ok" and table.loc["1", "status"] == "failed"


def test_a_job_with_a_bad_sae_config_is_refused_alone_up_front(tmp_path):
    """sae.d_sae=null with sae.expansion_factor=null is refused by the variant's own validation when the job is set
    up, with the one-line error, before the grouping sizes the SAEs; the other job trains (before, the width
    estimate raised a TypeError for the whole sweep)."""
    result = run_cli(["-m", "hydra/launcher=fanout", "data=synthetic", "sae.d_sae=null", "sae.expansion_factor=8,null",
                      "trainer.max_steps=10", "logger=none", f"paths.output_dir={tmp_path}"], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    assert json.loads((sweep_dir / "0" / "metrics.json").read_text())["l0"] > 0
    assert not (sweep_dir / "0" / "error.txt").exists()
    line = "error: sae.d_sae=None is not allowed: expected an integer, or set sae.expansion_factor"
    assert line in result.stderr.splitlines() and "TypeError" not in result.stderr
    assert "ConfigError" in (sweep_dir / "1" / "error.txt").read_text()
    assert not (sweep_dir / "1" / "metrics.json").exists()


@pytest.mark.slow
def test_killed_group_resumes_exactly(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """SIGKILL a fanned-out group after its first checkpoints, resume every job with ckpt_path=last in the
    same sweep directory: the jobs end exactly as an uninterrupted group does."""
    cache = tmp_path / "cache"

    def args(out: Path) -> list[str]:
        base = [a for a in _base(tiny_model_dir, tiny_corpus_dir, out, cache, "auto") if "every_n_train_steps" not in a
                and "log_every_n_steps" not in a]
        return [*base, "sae=relu,topk", "data.train_tokens=51200", "sae.expansion_factor=16",
                "callbacks.model_checkpoint.every_n_train_steps=20", "trainer.log_every_n_steps=1",
                "+logger.csv.flush_logs_every_n_steps=1", "hydra/launcher=fanout"]

    whole, _ = _sweep(args(tmp_path / "whole"), None)
    out = tmp_path / "killed"
    proc = run_until_then_kill(["-m", *args(out)], lambda: len(list(out.glob(
        "multirun/*/*/*/checkpoints/last.ckpt"))) == 2 and _logged_steps(out) >= 30)
    assert proc.returncode == -signal.SIGKILL, "the group ended before it could be killed"
    (sweep_dir,) = (out / "multirun").glob("*/*")
    assert not list(sweep_dir.glob("*/metrics.json"))
    resumed, _ = _sweep([*args(out), "ckpt_path=last", f"hydra.sweep.dir={sweep_dir}"], None)
    assert resumed == sweep_dir
    _assert_same_jobs(whole, sweep_dir, ["0", "1"])


def _logged_steps(out: Path) -> int:
    """The highest step job 0's CSV logger has flushed (it writes every step here)."""
    for path in out.glob("multirun/*/*/0/csv/metrics.csv"):
        rows = list(csv.DictReader(path.read_text().splitlines()))
        return max((int(r["step"]) for r in rows if r.get("step")), default=-1)
    return -1


# -- the pieces, in-process ------------------------------------------------------------------------------------
def _module(n: int) -> SAEModule:
    members = []
    for i in range(n):
        torch.manual_seed(i)
        sae = build_sae({"_target_": "saelab.saes.relu.ReluSAE", "d_in": 8, "d_sae": 16 * (i + 1)})
        members.append(SAEMember(sae, optim_config(lr=1e-2 * (i + 1), betas=None, lr_warmup_steps=2,
                                                    lr_decay_fraction=0.5), 10, 1000, hook=f"h{i}"))
    return SAEModule(members)


def test_group_checkpoint_splits_into_group_of_one_checkpoints_and_back():
    """A member's file holds exactly what a module of that member alone would save, and merging the files gives
    back the group's checkpoint (weights, Adam state per parameter group, one schedule per member)."""
    module = _module(3)
    optimizer = module.configure_optimizers()
    opt, sched = optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"]
    for _ in range(3):
        for p in module.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        opt.step()
        sched.step()
    group = {"global_step": 3, "state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()],
             "lr_schedulers": [sched.state_dict()], "loops": {"x": 1},
             "callbacks": {"ModelCheckpoint": {"dirpath": "/runs/0/checkpoints", "last_model_path":
                                               "/runs/0/checkpoints/last.ckpt"}}}
    rewrite = lambda s: s.replace("/runs/0/", "/runs/1/")  # noqa: E731
    own = split_checkpoint(group, 1, rewrite)
    single = SAEModule([module.members[1]])
    single_opt = single.configure_optimizers()["optimizer"]
    member_state = module.members[1].state_dict()  # a group of one saves its member's keys unprefixed
    assert own["state_dict"].keys() == member_state.keys()
    assert all(torch.equal(own["state_dict"][k], v) for k, v in member_state.items())
    single_opt.load_state_dict(own["optimizer_states"][0])  # loads: one group, parameters numbered from 0
    assert own["optimizer_states"][0]["param_groups"][0]["lr"] == opt.param_groups[1]["lr"]
    assert own["lr_schedulers"][0]["base_lrs"] == [sched.base_lrs[1]]
    assert own["callbacks"]["ModelCheckpoint"]["last_model_path"] == "/runs/1/checkpoints/last.ckpt"

    parts = [split_checkpoint(group, i) for i in range(3)]
    merged = merge_checkpoints(parts, [str] * 3)
    assert merged["state_dict"].keys() == group["state_dict"].keys()
    assert all(torch.equal(merged["state_dict"][k], v) for k, v in group["state_dict"].items())
    reference = group["optimizer_states"][0]
    assert merged["optimizer_states"][0]["param_groups"] == reference["param_groups"]
    for i, state in reference["state"].items():
        assert all(torch.equal(state[k], merged["optimizer_states"][0]["state"][i][k]) for k in state)
    assert merged["lr_schedulers"] == group["lr_schedulers"]
    with pytest.raises(ValueError, match="different steps"):
        merge_checkpoints([parts[0], parts[1] | {"global_step": 2}], [str, str])


def test_group_step_gives_each_member_its_own_gradient():
    """Summing the members' losses for one backward gives each member exactly its own loss's gradient."""
    module = _module(2)
    batch = {"h0": torch.randn(32, 8), "h1": torch.randn(32, 8)}
    module.training_step(batch, 0).backward()
    grads = [[p.grad.clone() for p in m.sae.parameters()] for m in module.members]
    for member, expected in zip(module.members, grads, strict=True):
        member.sae.zero_grad()
        out = member.sae.training_loss(batch[member.hook], member.coefficients(0))
        sum(out.terms.values()).backward()
        assert all(torch.equal(p.grad, g) for p, g in zip(member.sae.parameters(), expected, strict=True))


def _job(tmp_path: Path, num: int, **changes) -> Job:
    cfg = OmegaConf.create({
        "seed": 0, "model": {"name": "tiny", "hook": "blocks.0.hook_out", "hooks": None, "d_model": 32,
                             "device": "cpu"},
        "data": {"_target_": "saelab.data.sources.pydocs.PyDocs", "seed": 0, "batch_size": 256,
                 "train_tokens": 2560}, "trainer": {"precision": "32-true",
                                                                                 "max_steps": None},
        "callbacks": {"ckpt": {"dirpath": str(tmp_path / str(num) / "checkpoints")}}, "eval": {"tokens": 64},
        "paths": {"cache_dir": "c"}, "sae": {"_target_": "saelab.saes.relu.ReluSAE", "d_in": 32, "d_sae": 128},
        "optim": {"lr": 1e-3},
    })
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return Job(cfg=cfg, run_dir=tmp_path / str(num), overrides=[], multirun=True, num=num)


def test_group_key_separates_what_decides_the_stream(tmp_path):
    base = group_key(_job(tmp_path, 0))
    # The job's own choices do not split a group: init seed (data.seed fixed), hook, width, lr, bf16 autocast.
    for num, changes in enumerate([{"seed": 1}, {"model.hook": "blocks.1.hook_out"}, {"sae.d_sae": 256},
                                   {"optim.lr": 1e-2}, {"trainer.precision": "bf16-mixed"}], start=1):
        assert group_key(_job(tmp_path, num, **changes)) == base, changes
    # What decides the batches or the loop does.
    for num, changes in enumerate([{"data.seed": 1}, {"data.batch_size": 128}, {"data.train_tokens": 5120},
                                   {"trainer.deterministic": True}, {"eval.tokens": 128},
                                   {"trainer.precision": "tf32"}], start=10):  # TF32 is torch-global
        assert group_key(_job(tmp_path, num, **changes)) != base, changes


def test_without_a_data_seed_the_runs_seed_orders_the_data_and_splits_groups(tmp_path):
    """data.seed=null: each job's own seed orders its activations, so seed=0,1 must not share a stream (the
    group would have trained both on the first job's order)."""
    unseeded = [_job(tmp_path, num, **{"data.seed": None, "seed": num}) for num in range(2)]
    assert group_key(unseeded[0]) != group_key(unseeded[1])
    assert [len(g) for g in make_groups(unseeded, max_saes=8, memory_fraction=0.8)] == [1, 1]


def test_a_group_reads_only_what_its_jobs_share(tmp_path):
    """The training loop's settings come from shared_config: the sections group_key compares (the data order's
    seed among them), never a job's own (its sae, optim or init seed); jobs that differ there are refused."""
    jobs = [_job(tmp_path, 0), _job(tmp_path, 1, **{"seed": 7, "sae.d_sae": 256})]
    shared = shared_config(jobs)
    assert set(shared) == {"model", "data", "trainer", "callbacks", "eval", "paths", "seed"}
    assert shared.seed == 0 and shared.data.batch_size == 256  # data.seed 0 orders both jobs' data
    with pytest.raises(ValueError, match="differs in what its jobs must share"):
        shared_config([_job(tmp_path, 0), _job(tmp_path, 2, **{"data.batch_size": 128})])


def test_groups_split_by_count_and_by_memory(tmp_path, caplog):
    jobs = [_job(tmp_path, i, **{"seed": i}) for i in range(5)]
    assert [len(g) for g in make_groups(jobs, max_saes=2, memory_fraction=0.8)] == [2, 2, 1]
    one_sae = 4 * (4 * 3 * 32 * 128 + 6 * 256 * 128)
    assert [len(g) for g in split_by_limits(jobs, 8, budget=2 * one_sae)] == [2, 2, 1]
    assert [len(g) for g in split_by_limits(jobs, 8, budget=one_sae // 2)] == [1] * 5  # one SAE per group at least
    big = [_job(tmp_path, i, **{"seed": i, "sae.d_sae": 2**40}) for i in range(2)]
    with caplog.at_level("INFO", logger="saelab"):
        assert [len(g) for g in make_groups(big, max_saes=8, memory_fraction=0.8)] == [1, 1]
    assert "split into 2 groups" in caplog.text


def test_a_multirun_whose_every_job_fails_exits_non_zero(tmp_path):
    """One failing job leaves the sweep going (the test above); when every job fails (here both are refused by
    the config check before any training) the command exits non-zero with one line naming where the errors are,
    so a script or CI notices."""
    result = run_cli(["-m", "hydra/launcher=fanout", "data=synthetic", "sae.d_sae=null", "sae.expansion_factor=null",
                      "seed=0,1", "trainer.max_steps=10", "logger=none", f"paths.output_dir={tmp_path}"], timeout=300)
    assert result.returncode != 0
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    assert f"error: all 2 jobs of this multirun failed; each one's error is in {sweep_dir}/<job>/error.txt" in (
        result.stderr.splitlines())
    assert all("ConfigError" in (sweep_dir / job / "error.txt").read_text() for job in ("0", "1"))
