"""A saelab command (`saelab-train ARGS`, `saelab-eval ARGS`, ...) in its own process, forked from a warm one that
has already imported saelab's CLI.

Each run is still a separate process running the command's `main()` with its own argv, working directory,
environment, stdout and stderr (file descriptors 1 and 2, so C-level output is captured too) and exit code; what
it skips is starting a new interpreter and importing torch, Lightning and transformers (~7 s a run on this
CPU). The warm process is multiprocessing's fork server, started on first use with the environment of that
moment (conftest has set the offline and thread settings by then). SAELAB_TEST_FRESH_CLI=1 runs every
`run_cli` as a new interpreter instead; tests about what a fresh process prints ask for one (`fresh=True`).
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

_CONTEXT: multiprocessing.context.ForkServerContext | None = None


def _context() -> multiprocessing.context.ForkServerContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["saelab.cli.train"])
    return _CONTEXT


def _child(entry: str, argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The forked run: the command line's process state, then `entry` ("module:function", the command's main);
    its exit code (or the int it returns) is the process's, after the exit handlers run as at interpreter exit."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    module, function = entry.split(":")
    sys.argv = [argv[0], *argv[1:]]
    code = 0
    try:
        returned = getattr(importlib.import_module(module), function)()
        code = returned if isinstance(returned, int) else 0
    except SystemExit as exit_:  # as the interpreter ends on it: an int is the code, anything else is printed
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an uncaught error: a traceback and exit code 1, as python would give
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # what the interpreter runs at exit (multiprocessing's children skip it)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run_forked(args: list[str], cwd: Path, timeout: float, entry: str = "saelab.cli.train:main",
               prog: str = "saelab-train") -> subprocess.CompletedProcess:
    """`prog args` (the command whose main is `entry`) as a CompletedProcess (text stdout and stderr), forked
    warm."""
    with tempfile.TemporaryDirectory(prefix="saelab-cli-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = _context().Process(target=_child, args=(entry, [prog, *args], str(cwd), dict(os.environ), out,
                                                          err))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([prog, *args], timeout)
        read = lambda path: Path(path).read_text(errors="replace") if os.path.exists(path) else ""  # noqa: E731
        return subprocess.CompletedProcess([prog, *args], process.exitcode, read(out), read(err))
