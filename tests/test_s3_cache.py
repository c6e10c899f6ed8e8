"""Activation caches in a real S3 server (SeaweedFS on loopback, started here): built by one process or by workers,
trained on, resumed from after a kill; and every bad input refused in one line before training, nothing published.

Credentials and endpoint reach saelab the standard way (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL), as on a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import REPO, run_cli, run_module, run_until_then_kill, tiny_overrides
from tests.s3_server import free_ports, seaweedfs
from tests.test_resume import INTERVAL, STEPS, _checkpoint_step, _logged_steps
from tests.test_resume import _overrides as resume_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        if isinstance(server, str):
            pytest.skip(server)
        yield server


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    """A new bucket, and this test's environment pointed at the server (the CLI runs inherit it)."""
    name = f"saelab-{uuid.uuid4().hex[:12]}"
    s3.fs().mkdir(name)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return name


def cache_cli(args: list[str]) -> subprocess.CompletedProcess:
    return run_module("saelab.cli.cache", args)


def manifests(s3, bucket: str) -> list[str]:
    return [p for p in s3.fs().find(bucket) if p.endswith("/manifest.json")]


def test_a_cache_in_s3_is_built_trained_on_and_a_killed_run_resumes_from_it(s3, bucket, tiny_model_dir,
                                                                            tiny_corpus_dir, tmp_path):
    url = f"s3://{bucket}/caches"
    args = resume_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "whole", tmp_path / "unused", "topk", url)
    built = cache_cli(["build", *args])
    assert built.returncode == 0, built.stderr[-3000:]
    location = built.stdout.strip().splitlines()[-1]
    assert location.startswith(f"{url}/tiny--blocks.0.hook_out--")
    listing = cache_cli(["list", "--cache-dir", url])
    assert listing.returncode == 0 and location.rsplit("/", 1)[1] in listing.stdout, listing.stdout
    inspected = cache_cli(["inspect", location])
    assert inspected.returncode == 0 and "files match the sizes and sha256" in inspected.stdout

    whole = run_cli(args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    log = whole.stdout + whole.stderr
    assert f"activation cache: reusing {location}" in log and "activation cache: building" not in log
    (whole_dir,) = {p.parent for p in (tmp_path / "whole").rglob("metrics.json")}

    killed_out = tmp_path / "killed"
    killed_args = resume_overrides(tiny_model_dir, tiny_corpus_dir, killed_out, tmp_path / "unused", "topk", url)

    def checkpointed_and_past_it() -> bool:
        found = list(killed_out.rglob("checkpoints/last.ckpt"))
        return bool(found) and _logged_steps(found[0].parent.parent) >= INTERVAL + INTERVAL // 2

    proc = run_until_then_kill(killed_args, checkpointed_and_past_it)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    (last,) = killed_out.rglob("checkpoints/last.ckpt")
    run_dir, saved_step = last.parent.parent, _checkpoint_step(last)
    assert 0 < saved_step < STEPS and not (run_dir / "metrics.json").exists()
    resumed = run_cli([*killed_args, f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the activation stream after {saved_step} batches" in resumed.stdout + resumed.stderr
    expected = json.loads((whole_dir / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    for key in ("steps", "l0", "fvu", "dead_fraction", "normalization_scale"):
        assert got[key] == expected[key], key


def _worker(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saelab.cli.cache", "build", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_two_workers_build_in_s3_the_cache_one_process_builds_locally(s3, bucket, tiny_model_dir, tiny_corpus_dir,
                                                                      tmp_path, dtype):
    base = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"), f"data.cache_dtype={dtype}"]
    remote = [*base, f"data.cache=s3://{bucket}/caches"]
    workers = [_worker([f"--shard={i}/2", *remote]) for i in range(2)]  # at once, no coordination
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    assert all("shards written (publish with saelab-cache build --finish)" in log for log in logs), logs
    assert manifests(s3, bucket) == []  # nothing is published by the workers
    finished = cache_cli(["build", "--finish", *remote])
    assert finished.returncode == 0, finished.stderr[-3000:]
    location = finished.stdout.strip().splitlines()[-1]
    single = cache_cli(["build", *base, f"data.cache={tmp_path / 'local'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    local = tmp_path / "local" / location.rsplit("/", 1)[1]  # the same key: the same name
    fs = s3.fs()
    remote_manifest = json.loads(fs.cat_file(f"{location.removeprefix('s3://')}/manifest.json"))
    local_manifest = json.loads((local / "manifest.json").read_text())
    assert remote_manifest["dtype"] == dtype and remote_manifest["streams"] == local_manifest["streams"]
    shards = [s["file"] for spec in local_manifest["streams"].values() for s in spec["shards"]]
    assert len(shards) >= 2
    for name in shards:  # shard for shard, byte for byte
        assert fs.cat_file(f"{location.removeprefix('s3://')}/{name}") == (local / name).read_bytes(), name


# -- bad input: one line, exit 2, before training, nothing published ---------------------------------------
@pytest.fixture(scope="module")
def built(s3, tmp_path_factory, tiny_model_dir, tiny_corpus_dir):
    """A cache in its own bucket, for the tests that damage or lock it (each restores it)."""
    out = tmp_path_factory.mktemp("built")
    name = f"saelab-built-{uuid.uuid4().hex[:8]}"
    s3.fs().mkdir(name)
    env = s3.env()
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), f"data.cache=s3://{name}/caches"]
    result = subprocess.run([sys.executable, "-m", "saelab.cli.cache", "build", *args], cwd=REPO, text=True,
                            capture_output=True, env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return args, result.stdout.strip().splitlines()[-1].removeprefix("s3://")


def _refused(result: subprocess.CompletedProcess, starts: str, says: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(starts) and says in lines[0], result.stderr[-2000:]
    print(lines[0])  # the README quotes these lines (pytest -s)
    assert "Epoch" not in result.stdout + result.stderr  # refused before training


@pytest.mark.parametrize("case", ["unreachable endpoint", "wrong credentials", "missing bucket", "unknown dtype"])
def test_a_bad_store_setting_is_one_line_before_anything_runs(s3, bucket, tiny_model_dir, tiny_corpus_dir, tmp_path,
                                                              monkeypatch, case):
    url = f"s3://{bucket}/caches"
    if case == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
        says = "endpoint unreachable"
    elif case == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        says = "access denied (check the credentials)"
    elif case == "missing bucket":
        url, says = f"s3://no-such-{bucket}/caches", "does not exist"
    else:
        says = "data.cache_dtype='int8' is not allowed: expected one of 'float32', 'bfloat16', 'float16'"
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"), f"data.cache={url}"]
    if case == "unknown dtype":
        args.append("data.cache_dtype=int8")
    field = "error: data.cache_dtype=" if case == "unknown dtype" else f"error: data.cache='{url}' is not allowed"
    _refused(run_cli(args), field, says)
    _refused(cache_cli(["build", *args]), field, says)
    monkeypatch.undo()
    assert manifests(s3, bucket) == [] and not s3.fs().exists(f"no-such-{bucket}")


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_shard_damaged_remotely_is_refused_before_training_and_never_rebuilt(s3, built, monkeypatch, damage):
    args, location = built
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    fs = s3.fs()
    shard = f"{location}/train-00000.npy"
    original = fs.cat_file(shard)
    if damage == "deleted":
        fs.rm(shard)
        says = "train-00000.npy is missing; delete that cache to rebuild it"
    else:
        fs.pipe_file(shard, original[:-100])
        says = f"train-00000.npy has {len(original) - 100} bytes, expected {len(original)}"
    try:
        _refused(run_cli(args), f"error: data.cache='s3://{location.split('/')[0]}/caches' is not allowed", says)
        assert fs.exists(shard) == (damage == "truncated")  # not rebuilt under other readers
    finally:
        fs.pipe_file(shard, original)


def test_shares_and_finishing_steps_are_refused_when_they_cannot_work(s3, built, monkeypatch):
    args, location = built
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    _refused(cache_cli(["build", "--shard", "3/2", *args]), "error: --shard='3/2' is not allowed",
             "expected I/N with 0 <= I < N")
    fs = s3.fs()
    lease = f"{location}.lock"
    fs.pipe_file(lease, json.dumps({"owner": "another finishing step", "renewed": time.time()}).encode())
    before = fs.cat_file(f"{location}/manifest.json")
    try:
        _refused(cache_cli(["build", "--finish", *args]), f"error: --finish='s3://{location}' is not allowed",
                 "one finishing step at a time (another step holds")
    finally:
        fs.rm(lease)
    assert fs.cat_file(f"{location}/manifest.json") == before
