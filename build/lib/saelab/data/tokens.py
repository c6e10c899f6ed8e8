"""Documents -> fixed-length token windows, with a held-out split that is disjoint by document."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Document = str | list[int]  # a text, or token ids used as they are



@dataclass(frozen=True)
class SpecialTokens:
    """Ids the packer inserts and the activation stream excludes."""

    bos: int | None  # prepended to every window (CLS for BERT-style encoders)
    separator: int | None  # appended after every document (EOS, or SEP for encoders)
    excluded: frozenset[int]  # every special id (BOS, EOS, PAD, CLS, SEP, ...): never trained on

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        excluded = {i for i in tokenizer.all_special_ids if i is not None}
        excluded |= {i for i in (bos, sep, tokenizer.pad_token_id) if i is not None}
        return cls(bos, sep, frozenset(excluded))


def is_held_out(doc: Document, eval_fraction: float) -> bool:
    """A document's split is a function of its content, so it never changes with order or budget."""
    data = doc.encode("utf-8") if isinstance(doc, str) else str(doc).encode()
    bucket = int.from_bytes(hashlib.sha1(data).digest()[:4], "little") % 10_000
    return bucket < eval_fraction * 10_000


def split_documents(docs: Sequence[Document], eval_fraction: float) -> tuple[list[Document], list[Document]]:
    train, held_out = [], []
    for doc in docs:
        (held_out if is_held_out(doc, eval_fraction) else train).append(doc)
    return train, held_out


def tokenize(docs: Sequence[Document], tokenizer) -> list[list[int]]:
    """Token ids without special tokens; pre-tokenised documents are used as they are."""
    texts = [d for d in docs if isinstance(d, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    return [next(encoded) if isinstance(d, str) else list(d) for d in docs]


def pack(token_docs: Sequence[list[int]], context_size: int, special: SpecialTokens, prepend_bos: bool) -> Tensor:
    """Concatenate documents (each followed by the separator) and cut windows of `context_size`.

    With `prepend_bos`, each window starts with BOS and holds context_size - 1 document tokens. The ragged
    tail is dropped. Returns int64 [n_windows, context_size].
    """
    body = context_size - (1 if prepend_bos and special.bos is not None else 0)
    stream: list[int] = []
    for ids in token_docs:
        stream.extend(ids)
        if special.separator is not None:
            stream.append(special.separator)
    n = len(stream) // body
    if n == 0:
        return torch.empty(0, context_size, dtype=torch.long)
    windows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if body < context_size:
        windows = torch.cat([torch.full((n, 1), special.bos, dtype=torch.long), windows], dim=1)
    return windows


def keep_mask(windows: Tensor, special: SpecialTokens) -> Tensor:
    """True where a position is a real text token (its activation is trained on)."""
    if not special.excluded:
        return torch.ones_like(windows, dtype=torch.bool)
    return ~torch.isin(windows, torch.tensor(sorted(special.excluded), device=windows.device))
