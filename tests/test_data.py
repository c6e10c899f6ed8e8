"""Text sources, packing, special-token exclusion, the held-out split, the buffer and normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.data.buffer import ShuffleBuffer
from saelab.data.normalize import estimate_scale
from saelab.data.sources.pydocs import pydocs_documents
from saelab.data.sources.text_files import text_file_documents
from saelab.data.tokens import SpecialTokens, keep_mask, pack, split_documents
from saelab.errors import ConfigError

SPECIAL = SpecialTokens(bos=1, separator=2, excluded=frozenset({0, 1, 2}))


def test_pydocs_corpus_is_deterministic_docstrings_and_topics():
    docs = pydocs_documents()
    assert docs == pydocs_documents()
    assert len(docs) > 1000 and 1_000_000 < sum(map(len, docs)) < 5_000_000
    assert any("Return" in d for d in docs[:500])  # docstrings
    assert any("operator precedence" in d.lower() for d in docs[-200:])  # pydoc topics come last


def test_split_is_disjoint_by_document_and_stable_under_reordering():
    docs = [f"document number {i}" for i in range(2000)]
    train, held_out = split_documents(docs, 0.1)
    assert set(train).isdisjoint(held_out) and len(train) + len(held_out) == len(docs)
    assert 120 < len(held_out) < 280
    train_rev, held_rev = split_documents(docs[::-1], 0.1)
    assert set(held_rev) == set(held_out)


def test_pack_prepends_bos_and_separates_documents():
    windows = pack([[10, 11, 12], [13, 14], [15, 16, 17, 18]], context_size=4, special=SPECIAL, prepend_bos=True)
    # stream: 10 11 12 2 13 14 2 15 16 17 18 2 -> bodies of 3 after BOS
    assert windows.tolist() == [[1, 10, 11, 12], [1, 2, 13, 14], [1, 2, 15, 16], [1, 17, 18, 2]]
    assert pack([[3, 4]], 4, SPECIAL, prepend_bos=False).shape == (0, 4)


def test_keep_mask_excludes_every_special_token():
    windows = torch.tensor([[1, 10, 2, 11], [0, 12, 13, 1]])
    assert keep_mask(windows, SPECIAL).tolist() == [[False, True, False, True], [False, True, True, False]]


def test_text_files_source_reads_a_directory_and_rejects_a_missing_path(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "skip.bin").write_text("binary")
    assert text_file_documents(str(tmp_path)) == ["first", "second"]
    with pytest.raises(ConfigError, match="data.path"):
        text_file_documents(str(tmp_path / "missing"))


def test_shuffle_buffer_is_bounded_yields_every_activation_once_and_mixes_chunks():
    chunks = [torch.full((100, 3), float(i)) for i in range(20)]  # 2000 rows, chunk i filled with i
    seen_sources = []
    buffer = ShuffleBuffer(chunks, capacity=400, batch_size=50, generator=torch.Generator().manual_seed(0))
    batches = list(buffer)
    assert all(b.shape == (50, 3) for b in batches)
    values = torch.cat(batches)[:, 0]
    assert len(values) == 2000 and torch.bincount(values.long()).tolist() == [100] * 20
    for b in batches[:4]:
        seen_sources.append(len(b[:, 0].unique()))
    assert min(seen_sources) >= 3  # a batch mixes several chunks
    # the buffer's own storage is exactly its capacity, whatever the stream's length
    gen = iter(ShuffleBuffer(iter(chunks * 50), 400, 50, torch.Generator().manual_seed(0)))
    next(gen)
    frame = gen.gi_frame.f_locals
    assert frame["buffer"].shape == (400, 3)


def test_normalisation_scales():
    raw = torch.randn(5000, 16) * 3 + 1
    c = estimate_scale(raw, "unit_mean_squared_norm")
    assert (raw / c).pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-5)
    c = estimate_scale(raw, "sqrt_d_model")
    assert (raw / c).norm(dim=-1).mean().item() == pytest.approx(math.sqrt(16), rel=1e-5)
    assert estimate_scale(raw, "none") == 1.0
    with pytest.raises(ConfigError, match="data.normalize"):
        estimate_scale(raw, "l2")


def test_hf_source_reads_text_or_pretokenised_columns_from_a_local_dataset(tmp_path):
    import json

    from saelab.data.sources.hf import HFDataset

    rows = [{"text": f"document {i}", "ids": [i, i + 1, i + 2]} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"source": "hf", "path": str(tmp_path), "split": "train", "text_column": "text", "token_column": None,
           "max_documents": 3, "streaming": True}
    assert HFDataset(cfg).documents() == ["document 0", "document 1", "document 2"]
    assert HFDataset(cfg | {"token_column": "ids"}).documents() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    with pytest.raises(ConfigError, match="data.text_column='body'.*text, ids"):
        HFDataset(cfg | {"text_column": "body"}).documents()


def test_pretokenised_documents_are_packed_as_they_are():
    from saelab.data.tokens import tokenize

    class NoTextTokenizer:
        def __call__(self, texts, add_special_tokens):
            raise AssertionError("pre-tokenised documents must not be re-tokenised")

    assert tokenize([[5, 6], [7]], NoTextTokenizer()) == [[5, 6], [7]]
