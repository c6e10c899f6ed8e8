"""`data=text_files`: local text, one document per file (a file, or every .txt/.md file under a directory)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saelab.data.sources.base import TextSource
from saelab.errors import ConfigError

SUFFIXES = (".txt", ".md")


class TextFiles(TextSource):
    name = "text_files"

    def __init__(self, data_cfg: Mapping[str, Any]):
        super().__init__(data_cfg)
        self.path = data_cfg.get("path")

    def check(self) -> None:
        if self.path is None or not Path(str(self.path)).expanduser().exists():
            raise ConfigError("data.path", self.path, "an existing text file or directory")

    def documents(self) -> list[str]:
        return text_file_documents(str(self.path))

    def own_key_inputs(self) -> dict[str, Any]:
        from saelab.data.cache_key import fingerprint

        path = Path(str(self.path)).expanduser().resolve()
        return {"path": str(path), "files": fingerprint(path)}


def text_file_documents(path: str, suffixes: tuple[str, ...] = SUFFIXES) -> list[str]:
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
