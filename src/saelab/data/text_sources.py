"""Where the text comes from. Every source returns a list of documents (strings or token-id lists).

`pydocs`, the offline default, is built deterministically from the running Python's standard library:
module, class and function docstrings (read with `ast`, nothing is imported) plus the pydoc topics.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError

Document = str | list[int]

# Packages of the standard library that are tests, vendored code or tools rather than library docs.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
_MIN_DOC_CHARS = 40


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


def text_file_documents(path: str, suffixes: tuple[str, ...] = (".txt", ".md")) -> list[str]:
    """One document per file (a file, or every matching file under a directory, sorted)."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    else:
        raise ConfigError("data.path", path, "an existing text file or directory")
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError("data.path", path, f"a file or directory with non-empty text ({', '.join(suffixes)})")
    return docs


def hf_documents(
    path: str, split: str, text_column: str | None, token_column: str | None, max_documents: int | None,
    streaming: bool = True,
) -> list[Document]:
    """Documents from a Hugging Face dataset (hub name or local directory), streamed when possible."""
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split, streaming=streaming)
    except FileNotFoundError:
        raise ConfigError("data.path", path, "a Hugging Face dataset name or local dataset directory") from None
    column = token_column or text_column
    docs: list[Document] = []
    for i, row in enumerate(ds):
        if column not in row:
            field = "data.token_column" if token_column else "data.text_column"
            raise ConfigError(field, column, "a column of the dataset: " + ", ".join(row))
        if max_documents is not None and i >= max_documents:
            break
        docs.append(list(row[column]) if token_column else str(row[column]))
    return docs


def load_documents(data_cfg: Mapping[str, Any]) -> list[Document]:
    source = data_cfg["source"]
    if source == "pydocs":
        docs: list[Document] = pydocs_documents()
    elif source == "text_files":
        docs = text_file_documents(data_cfg["path"])
    elif source == "hf":
        docs = hf_documents(
            data_cfg["path"], data_cfg.get("split", "train"), data_cfg.get("text_column"),
            data_cfg.get("token_column"), data_cfg.get("max_documents"), data_cfg.get("streaming", True),
        )
    else:
        raise ConfigError("data.source", source, ("pydocs", "text_files", "hf"))
    if not docs:
        raise ConfigError("data.source", source, "a source with at least one document")
    return docs
