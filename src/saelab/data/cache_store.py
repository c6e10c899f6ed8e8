"""Where activation caches live: a local directory or any fsspec URL (s3://, gs://, hf://, memory://, ...).

fsspec (with s3fs, gcsfs, huggingface_hub's HfFileSystem) already reads and writes every store researchers keep
activations in, with the usual credentials (environment variables, ~/.aws, gcloud's, HF_TOKEN) and endpoints
(AWS_ENDPOINT_URL, or fsspec's own config: FSSPEC_S3_ENDPOINT_URL, ~/.config/fsspec/*.json), so this module only
adds what a cache needs on top of it:

- Atomic writes. A local file is written to a temp file and renamed into place; an object store has no rename
  but needs none: an object appears whole when its put completes.
- A lock per cache, so one job builds while the others wait. Locally a flock (released if the process dies).
  Object stores have no flock: there the lock is a lease object created by a conditional put (If-None-Match,
  which S3, GCS and SeaweedFS honour), renewed by its holder while it works and taken over once it has not been
  renewed for LEASE_SECONDS (its holder died).
- One check, before any heavy work, that the location can be used: reachable, credentials accepted, bucket
  present, writable; each failure is one line naming data.cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock, Timeout
from fsspec.implementations.local import LocalFileSystem

from saelab.errors import ConfigError
from saelab.io import atomic_write

_BUCKETED = {"s3", "s3a", "gs", "gcs", "abfs", "az"}  # object stores whose first path component is a bucket
LEASE_SECONDS = 300.0  # a remote lock not renewed for this long belongs to a dead holder
_POLL_SECONDS = 2.0
ALLOWED = "off, auto, a writable directory or an fsspec URL (s3://bucket/prefix, gs://..., memory://...)"


class CacheBusy(RuntimeError):
    """Another process holds the lock of a cache (raised only when told not to wait)."""


def is_url(value: str) -> bool:
    return "://" in value


class Store:
    """A directory of caches: `root` on the filesystem fsspec resolves from the location."""

    def __init__(self, location: str | os.PathLike[str]):
        location = str(location)
        self.url = location if is_url(location) else str(Path(location).expanduser())
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        protocol = self.fs.protocol
        self.protocol = protocol if isinstance(protocol, str) else protocol[0]
        if self.local:
            self.root = str(Path(self.root))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def child(self, name: str) -> Store:
        return Store(self.where(name))

    def where(self, rel: str = "") -> str:
        """The location of `rel` as a user would type it (a path or a URL)."""
        if not rel:
            return self.url
        return str(Path(self.url) / rel) if self.local else f"{self.url.rstrip('/')}/{rel}"

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def local_path(self, rel: str = "") -> Path:
        assert self.local, "only a local store has paths"
        return Path(self._path(rel))

    # -- files ---------------------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def write_bytes(self, rel: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write `rel` whole or not at all; `exclusive`: FileExistsError if it exists (a conditional put)."""
        if self.local:
            path = self.local_path(rel)
            if exclusive:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "xb") as fh:
                    fh.write(data)
            else:
                atomic_write(path, lambda tmp: tmp.write_bytes(data))
            return
        if not exclusive:
            self.fs.pipe_file(self._path(rel), data)
            return
        try:
            self.fs.pipe_file(self._path(rel), data, mode="create")
        except FileExistsError:
            raise
        except OSError as err:
            if "pre-condition" in str(err).lower() or "precondition" in str(err).lower():
                raise FileExistsError(self.where(rel)) from err
            raise

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, data: Any, *, exclusive: bool = False) -> None:
        text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
        self.write_bytes(rel, text.encode(), exclusive=exclusive)

    def sizes(self, rel_dir: str = "") -> dict[str, int]:
        """{name: bytes} of the files directly in `rel_dir` (empty when it does not exist): one listing call."""
        try:
            listing = self.fs.ls(self._path(rel_dir), detail=True, **({} if self.local else {"refresh": True}))
        except FileNotFoundError:
            return {}
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
                for entry in listing if entry.get("type") == "file"}

    def dirs(self) -> list[str]:
        """The names of the directories directly under the root (the caches of a store)."""
        try:
            listing = self.fs.ls(self.root, detail=True, **({} if self.local else {"refresh": True}))
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in listing if e.get("type") == "directory")

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(rel), recursive=True)

    def mtime(self, rel: str) -> float | None:
        """When `rel` was last written (seconds since the epoch), None if it does not exist."""
        try:
            info = self.fs.info(self._path(rel))
        except FileNotFoundError:
            return None
        stamp = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
        if stamp is None:
            return None
        return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)

    # -- locks ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, *, wait: bool = True) -> Iterator[Lease | None]:
        """Hold the lock of cache `name`; `wait=False`: CacheBusy at once if another process holds it.

        Yields the remote lease (renew it while working: `lease.renew()`), None for a local flock.
        """
        if self.local:
            lock = FileLock(str(self.local_path(f"{name}.lock")))
            try:
                lock.acquire(timeout=0 if not wait else -1)
            except Timeout:
                raise CacheBusy(self.where(f"{name}.lock")) from None
            try:
                yield None
            finally:
                lock.release()
            return
        lease = Lease(self, f"{name}.lock")
        lease.acquire(wait)
        try:
            yield lease
        finally:
            lease.release()

    # -- the up-front check --------------------------------------------------------------------------------
    def check_writable(self, value: str) -> None:
        """ConfigError (one line naming data.cache) unless this location can be listed and written."""
        probe = f".write-test-{uuid.uuid4().hex}"
        try:
            if self.local:
                self.local_path().mkdir(parents=True, exist_ok=True)
            elif self.protocol in _BUCKETED:  # some servers make a bucket on the first put: a typo must not
                bucket = self.root.split("/")[0]
                try:
                    self.fs.info(bucket)
                except FileNotFoundError:
                    raise FileNotFoundError(f"bucket {bucket!r} does not exist") from None
            self.write_bytes(probe, b"")
            self.remove(probe)
        except Exception as err:  # each store raises its own kinds: name the reason in the one line
            raise ConfigError("data.cache", value, f"{ALLOWED} ({self.url} cannot be written: "
                              f"{_reason(err)})") from None


def _reason(err: BaseException) -> str:
    """A store error as a few words: the kind of failure first (what a user acts on), then fsspec's message."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    text = " ".join(str(text).split())[:200]
    kinds = [(PermissionError, "access denied (check the credentials)"),
             (FileNotFoundError, "no such bucket or directory")]
    for kind, words in kinds:
        if isinstance(err, kind):
            return f"{words}: {text}"
    if _unreachable(err):
        return f"endpoint unreachable: {text}"
    return text


def _unreachable(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (ConnectionError, socket.gaierror, TimeoutError)):
            return True
        if "connect" in type(seen).__name__.lower():  # botocore's EndpointConnectionError, aiohttp's
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Lease:
    """A lock on an object store: an object created by a conditional put, renewed while held."""

    def __init__(self, store: Store, rel: str):
        self.store, self.rel = store, rel
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "renewed": time.time()}).encode()

    def _stale(self) -> bool:
        try:
            held = json.loads(self.store.read_bytes(self.rel))
        except FileNotFoundError:
            return False  # released meanwhile: try again
        except (ValueError, OSError):
            return True  # unreadable: nobody can renew it
        return time.time() - float(held.get("renewed", 0)) > LEASE_SECONDS

    def acquire(self, wait: bool) -> None:
        while True:
            try:
                self.store.write_bytes(self.rel, self._body(), exclusive=True)
                self.held = True
                return
            except FileExistsError:
                if self._stale():
                    self.store.remove(self.rel)  # its holder died; whoever puts first next wins
                    continue
                if not wait:
                    raise CacheBusy(self.store.where(self.rel)) from None
                time.sleep(_POLL_SECONDS)

    def renew(self) -> None:
        if self.held:
            self.store.write_bytes(self.rel, self._body())

    def release(self) -> None:
        if self.held:
            self.store.remove(self.rel)
            self.held = False


def npy_bytes(array: Any) -> bytes:
    """An array as the bytes of an .npy file (what np.save writes)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()
