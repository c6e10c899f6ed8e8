"""`data=hf`: a Hugging Face dataset (hub name or local directory), streamed when possible.

A hub name needs the network the first time; nothing else here does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.data.sources.base import Document, TextSource
from saelab.errors import ConfigError
from saelab.sections import read_section

FIELDS = ("path", "split", "text_column", "token_column", "max_documents")  # what decides the documents


@dataclass(frozen=True)
class HFFields:
    """data=hf's own fields (conf/data/hf.yaml documents them)."""

    path: str | None
    split: str
    text_column: str | None
    token_column: str | None
    max_documents: int | None
    streaming: bool


class HFDataset(TextSource):
    name = "hf"

    def __init__(self, data_cfg: Mapping[str, Any]):
        super().__init__(data_cfg)
        own = read_section("data", HFFields, data_cfg, passthrough=True)
        self.path, self.split, self.text_column = own.path, own.split, own.text_column
        self.token_column, self.max_documents, self.streaming = own.token_column, own.max_documents, own.streaming

    def check(self) -> None:
        if not self.path:
            raise ConfigError("data.path", self.path, "a Hugging Face dataset name or local directory")

    def documents(self) -> list[Document]:
        return hf_documents(str(self.path), self.split, self.text_column, self.token_column, self.max_documents,
                            self.streaming)

    def own_key_inputs(self) -> dict[str, Any]:
        from saelab.data.cache_key import fingerprint

        spec = {field: getattr(self, field) for field in FIELDS}
        local = Path(str(self.path)).expanduser()
        return {**spec, "files": fingerprint(local) if local.exists() else None}


def hf_documents(path: str, split: str, text_column: str | None, token_column: str | None,
                 max_documents: int | None, streaming: bool = True) -> list[Document]:
    """Documents from a Hugging Face dataset: the text column, or the token-id column used as is."""
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
