"""Run several saelab-train command lines in one Python process, through saelab.cli.train.main().

    python -m tests.cli_batch CASES.json RESULTS.json

CASES.json is a list of argument lists; RESULTS.json gets, per case, the exit code and what it printed to
stderr. The bad-input table uses this: each case fails in well under a second, so starting a fresh
interpreter (importing torch, Lightning and transformers, ~6 s) per case would dominate the test time.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from hydra.core.global_hydra import GlobalHydra

from saelab.cli.train import main


def run(argv: list[str]) -> dict:
    GlobalHydra.instance().clear()
    stderr = io.StringIO()
    sys.argv = ["saelab-train", *argv]
    code: int | str = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # noqa: BLE001 - reported to the test, which expects exit code 2
            code = "exception"
            traceback.print_exc(file=stderr)
    return {"code": code, "stderr": stderr.getvalue()}


if __name__ == "__main__":
    cases_file, results_file = sys.argv[1:3]
    with open(cases_file) as fh:
        cases = json.load(fh)
    results = [run(case) for case in cases]
    with open(results_file, "w") as fh:
        json.dump(results, fh)
