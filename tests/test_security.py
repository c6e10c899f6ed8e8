"""Security properties of the main job: no network when offline, no secrets in outputs, no pickle loading.

The end-to-end tests run the real CLI in a subprocess on the tiny model with a `sitecustomize.py` that
blocks (and records) every network connection a Python process makes.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides

# Imported by every Python process started with its directory first on PYTHONPATH (the job and any Python
# child it starts). Only AF_UNIX sockets may connect (each such connect is listed in $SAELAB_NET_UNIX): W&B's
# offline mode talks to its local `wandb-core` service process over a Unix domain socket on Linux (measured:
# that is the only connection the job makes), so no loopback exception is needed. Any other connect, name
# lookup or datagram is appended to $SAELAB_NET_LOG and raises. The `wandb-core` service itself is a Go
# binary this cannot patch; in offline mode it has no reason to connect anywhere, and an upload would need
# the Python side to ask for it.
SITECUSTOMIZE = textwrap.dedent('''
    import os
    import socket
    import traceback

    _LOG = os.environ["SAELAB_NET_LOG"]
    _LOADED = os.environ["SAELAB_NET_LOADED"]
    _UNIX = os.environ["SAELAB_NET_UNIX"]


    def _record(what, detail):
        stack = "".join(traceback.format_stack(limit=8)[:-2])
        with open(_LOG, "a") as fh:
            fh.write(f"pid {os.getpid()}: {what} {detail!r}\\n{stack}\\n")


    def _unix(sock):
        return getattr(sock, "family", None) == socket.AF_UNIX


    def _guard(name, original):
        def guarded(self, *args, **kwargs):
            if _unix(self):
                with open(_UNIX, "a") as fh:
                    fh.write(f"pid {os.getpid()}: socket.{name} {args!r}\\n")
                return original(self, *args, **kwargs)
            _record(f"socket.{name}", args)
            raise OSError(f"network blocked by the test harness: socket.{name}{args!r}")
        return guarded


    for _name in ("connect", "connect_ex", "sendto", "sendmsg"):
        setattr(socket.socket, _name, _guard(_name, getattr(socket.socket, _name)))


    def _blocked(name):
        def blocked(*args, **kwargs):
            _record(f"socket.{name}", args)
            raise OSError(f"network blocked by the test harness: socket.{name}{args!r}")
        return blocked


    socket.create_connection = _blocked("create_connection")
    socket.getaddrinfo = _blocked("getaddrinfo")
    with open(_LOADED, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
''')


def _blocked_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], Path, Path, Path]:
    site_dir = tmp_path / "netblock"
    site_dir.mkdir(exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    attempts, loaded, unix = tmp_path / "net-attempts.log", tmp_path / "net-loaded.log", tmp_path / "net-unix.log"
    for log in (attempts, loaded, unix):
        log.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "HF_TOKEN", "WANDB_SERVICE")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(site_dir), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        SAELAB_NET_LOG=str(attempts), SAELAB_NET_LOADED=str(loaded), SAELAB_NET_UNIX=str(unix), HF_HUB_OFFLINE="1",
        WANDB_MODE="offline", **extra,
    )
    return env, attempts, loaded, unix


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saelab.cli.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


def _overrides(tiny_model_dir, tiny_corpus_dir, out: Path, logger: str) -> list[str]:
    args = [a for a in tiny_overrides(tiny_model_dir, tiny_corpus_dir, out) if not a.startswith("logger=")]
    return [*args, f"logger={logger}", "data.train_tokens=2560"]


def test_the_network_blocker_records_and_refuses_connections(tmp_path):
    """The harness itself: a plain connection attempt is recorded and fails; a Unix socket still works."""
    env, attempts, loaded, unix = _blocked_env(tmp_path)
    probe = textwrap.dedent(f"""
        import socket
        a, b = socket.socketpair(socket.AF_UNIX)
        server = socket.socket(socket.AF_UNIX); server.bind({str(tmp_path / 'u.sock')!r}); server.listen()
        socket.socket(socket.AF_UNIX).connect({str(tmp_path / 'u.sock')!r})
        for call in (lambda: socket.create_connection(("127.0.0.1", 9)), lambda: socket.getaddrinfo("pypi.org", 443),
                     lambda: socket.socket().connect(("127.0.0.1", 9))):
            try:
                call()
            except OSError as err:
                assert "blocked by the test harness" in str(err), err
            else:
                raise SystemExit("not blocked")
    """)
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    log = attempts.read_text()
    assert "socket.create_connection" in log and "socket.getaddrinfo" in log and "socket.connect" in log
    assert loaded.read_text().strip() and "u.sock" in unix.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["wandb"])  # the logger that talks to a service (csv: left out for CI time)
def test_main_job_makes_no_network_connection(logger, tiny_model_dir, tiny_corpus_dir, tmp_path):
    out = tmp_path / "outputs"
    env, attempts, loaded, unix = _blocked_env(tmp_path)
    result = _run(_overrides(tiny_model_dir, tiny_corpus_dir, out, logger), env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in out.rglob("metrics.json")]
    assert json.loads((run_dir / "metrics.json").read_text())["tokens_trained"] == 2560
    assert loaded.read_text().strip(), "the network blocker was not loaded into the job"
    assert attempts.read_text() == "", attempts.read_text()
    if logger == "wandb":
        assert list((run_dir / "wandb").glob("offline-run-*/*.wandb")), "no offline W&B run was written"
        # W&B's offline run went through the patched socket module: its service connection was seen (and allowed).
        assert "socket.connect" in unix.read_text()
    else:
        assert unix.read_text() == ""
    # Weights leave the project as safetensors; the only pickle-based file is Lightning's own checkpoint.
    assert (run_dir / "sae" / "sae_weights.safetensors").is_file()
    pickled = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
               if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")}
    assert "checkpoints/last.ckpt" in pickled
    assert all(p.startswith("checkpoints/") and p.endswith(".ckpt") for p in pickled), pickled


@pytest.mark.slow
def test_secrets_from_the_environment_never_reach_the_outputs(tiny_model_dir, tiny_corpus_dir, tmp_path):
    wandb_key, hf_token = secrets.token_hex(20), "hf_" + secrets.token_urlsafe(24)  # W&B keys are 40 hex chars
    out = tmp_path / "outputs"
    env, attempts, _, _ = _blocked_env(tmp_path, WANDB_API_KEY=wandb_key, HF_TOKEN=hf_token)
    marker = secrets.token_hex(8)  # a harmless string passed the way a config value would be: the scan sees it
    result = _run([*_overrides(tiny_model_dir, tiny_corpus_dir, out, "wandb"), f"tags=[{marker}]"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in out.rglob("metrics.json")]
    files = [p for p in out.rglob("*") if p.is_file()]
    (wandb_log,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    # The scan below would see a leak: the marker is found in the Hydra config and in the W&B run log.
    assert marker.encode() in (run_dir / ".hydra" / "config.yaml").read_bytes()
    assert marker.encode() in wandb_log.read_bytes()
    for secret in (wandb_key, hf_token):
        for needle in {secret.encode(), secret.encode("utf-16-le")}:
            leaked = [p for p in files if needle in p.read_bytes()]
            assert not leaked, leaked
        assert secret not in result.stdout and secret not in result.stderr
    assert attempts.read_text() == "", attempts.read_text()  # WANDB_MODE=offline: nothing goes out with a key


# -- static checks ---------------------------------------------------------------------------------------------


def _python_files() -> list[Path]:
    files = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    assert len(files) > 20
    return files


def _calls(tree: ast.AST, module: str, name: str) -> list[ast.Call]:
    """Calls of `module.name(...)`, also through `import module as m` and `from module import name [as n]`."""
    modules, names = {module}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == module and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == module:
            names |= {a.asname or a.name for a in node.names if a.name == name}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == name and isinstance(f.value, ast.Name) and f.value.id in modules
                or isinstance(f, ast.Name) and f.id in names):
            found.append(node)
    return found


def _keyword_is(call: ast.Call, key: str, value: object) -> bool:
    return any(k.arg == key and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def test_calls_checker_sees_through_aliases():
    tree = ast.parse("import torch as t\nfrom torch import load as ld\nt.load('a')\nld('b', weights_only=True)\n")
    calls = _calls(tree, "torch", "load")
    assert len(calls) == 2 and [_keyword_is(c, "weights_only", True) for c in calls] == [False, True]


def test_every_torch_load_uses_weights_only():
    checked, bad = 0, []
    for path in _python_files():
        for call in _calls(ast.parse(path.read_text(), str(path)), "torch", "load"):
            checked += 1
            if not _keyword_is(call, "weights_only", True):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"
    assert checked >= 1  # benchmarks/train_step.py loads activations


def test_every_lightning_checkpoint_load_uses_weights_only():
    """Lightning unpickles a checkpoint given to fit/validate/test/predict(ckpt_path=...) or load_from_checkpoint."""
    checked, bad = 0, []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            loads = node.func.attr == "load_from_checkpoint" or (
                node.func.attr in ("fit", "validate", "test", "predict") and any(k.arg == "ckpt_path" for k in
                                                                                node.keywords))
            if loads:
                checked += 1
                if not _keyword_is(node, "weights_only", True):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, f"checkpoint loads without weights_only=True: {bad}"
    assert checked >= 1  # train.py resumes with trainer.fit(..., ckpt_path=...)


def test_no_pickle_based_reads_or_writes_in_src():
    """Weights are written with safetensors; Lightning writes its own checkpoint (no torch.save in src);
    .npy activation shards are read without pickle."""
    bad = []
    for path in sorted((REPO / "src").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO)
        bad += [f"{where}:{c.lineno} torch.save" for c in _calls(tree, "torch", "save")]
        bad += [f"{where}:{c.lineno} pickle.{n}" for n in ("load", "loads", "dump", "dumps")
                for c in _calls(tree, "pickle", n)]
        bad += [f"{where}:{c.lineno} np.load(allow_pickle=True)" for c in _calls(tree, "numpy", "load")
                if not _keyword_is(c, "allow_pickle", False) and any(k.arg == "allow_pickle" for k in c.keywords)]
    assert not bad, bad
    export = (REPO / "src" / "saelab" / "saes" / "saelens_format.py").read_text()
    assert "from safetensors.torch import" in export and "save_file(" in export
