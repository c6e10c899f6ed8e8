"""`data=pydocs`, the offline default: docstrings of the running Python's standard library.

Module, class and function docstrings (read with `ast`, nothing is imported) plus the pydoc topics, in a fixed
order, so the corpus is decided by the Python build alone.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from saelab.data.sources.base import TextSource

# Packages of the standard library that are tests, vendored code or tools rather than library docs.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
_MIN_DOC_CHARS = 40


class PyDocs(TextSource):
    name = "pydocs"

    def documents(self) -> list[str]:
        return pydocs_documents()

    def own_key_inputs(self) -> dict[str, Any]:
        return {"python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]}


def pydocs_documents() -> list[str]:
    """Docstrings of the standard library in a fixed order (sorted paths, AST order), then pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                docs.extend(_docstrings(Path(dirpath) / name))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    docs.extend(topics[key] for key in sorted(topics))
    return docs


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [doc for doc in found if doc and len(doc) >= _MIN_DOC_CHARS]
