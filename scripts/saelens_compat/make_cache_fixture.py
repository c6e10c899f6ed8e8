"""Make the SAELens activation cache that tests/test_saelens_cache.py reads with `data=saelens_cache`: written by
SAELens's own `CacheActivationsRunner` (its on-disk format: a Hugging Face `datasets` directory, one row per context
window, an `Array2D(ctx, d_in)` column named after the hook and `token_ids`), with the activations SAELens's own
`ActivationsStore` reads back from it kept beside it (expected.safetensors), so saelab's reader is checked against
SAELens's and not against itself.

Run once, with a Python that has sae-lens installed (never saelab's environment; scripts/saelens_compat/venv.sh makes
one at $SAELENS_VENV), from the project root, on the tests' tiny GPT-2 (tests/conftest.py builds it):
    .venv/bin/python -c "from pathlib import Path; from tests.conftest import build_tiny_model; \
build_tiny_model(Path('/tmp/tiny'))"
    $SAELENS_VENV/bin/python scripts/saelens_compat/make_cache_fixture.py /tmp/tiny tests/fixtures/saelens_cache

The model is that GPT-2 (d_model 32, its weights converted by TransformerLens 3.x, nothing downloaded), read at
blocks.0.hook_resid_post. The text is WINDOWS pre-tokenised windows of CTX tokens (SAELens's "tokens" column): short
sentences, each window opening with <|endoftext|> (id 0, the tokenizer's BOS and EOS) and sentences separated by
it, with <unk> (id 1) put in at a few places, so the cache has positions of both kinds of special token. The runner
writes SHARDS arrow files. expected.safetensors holds:
  activations        [rows, 32]  what ActivationsStore(cached_activations_path=..., exclude_special_tokens=[0, 1])
                                 yields batch after batch, in order: saelab's reading must equal it
  excluded_token_ids [2]         those ids (the tiny tokenizer's special ids, what saelab's own stream excludes)
  all_activations    [WINDOWS * CTX, 32] and token_ids [WINDOWS, CTX]: every position, unfiltered
  bos_only           [rows', 32] the store with exclude_special_tokens=True (the tokenizer's BOS/EOS/PAD/SEP ids:
                                 here only 0; <unk> is kept): SAELens's narrower set, for the record
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import sae_lens
import sae_lens.cache_activations_runner as runner_module
import torch
from datasets import Dataset
from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from transformers import AutoTokenizer, GPT2LMHeadModel

HOOK, CTX, WINDOWS, SHARDS, BATCH = "blocks.0.hook_resid_post", 16, 48, 3, 4
EXCLUDED = [0, 1]  # <|endoftext|>, <unk>: the tiny tokenizer's special ids (tests/conftest.py)
WORDS = ["the", "red", "small", "cat", "dog", "sees", "finds", "tree", "house", "river", "old", "quiet"]


def hooked_tiny(model_dir: Path) -> HookedTransformer:
    """The tests' tiny GPT-2 as a TransformerLens 3.x HookedTransformer, unprocessed (no LayerNorm folding)."""
    hf = GPT2LMHeadModel.from_pretrained(model_dir)
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions,
                                  d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
                                  d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
                                  eps=c.layer_norm_epsilon,
                                  original_architecture="GPT2LMHeadModel", default_prepend_bos=False)
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


def windows(tokenizer) -> list[list[int]]:
    """WINDOWS windows of CTX token ids: BOS, then sentences each followed by EOS, with a few <unk>."""
    rng = random.Random(0)
    stream: list[int] = []
    while len(stream) < WINDOWS * (CTX - 1):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "."
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if rng.random() < 0.2:
            ids.insert(rng.randrange(len(ids)), tokenizer.unk_token_id)
        stream += [*ids, tokenizer.eos_token_id]
    body = CTX - 1
    return [[tokenizer.bos_token_id, *stream[i * body : (i + 1) * body]] for i in range(WINDOWS)]


def read_back(model: HookedTransformer, cache: Path, exclude: torch.Tensor | None) -> torch.Tensor:
    """Every activation SAELens's ActivationsStore reads from the cache in one epoch, batch after batch, in order,
    positions whose token id is in `exclude` dropped (its own filter)."""
    store = ActivationsStore(model=model, dataset=None, streaming=False, hook_name=HOOK, hook_head_index=None,
                             context_size=CTX, d_in=model.cfg.d_model, n_batches_in_buffer=2,
                             total_training_tokens=WINDOWS * CTX, store_batch_size_prompts=BATCH,
                             train_batch_size_tokens=BATCH * CTX, prepend_bos=False, normalize_activations="none",
                             device=torch.device("cpu"), dtype="float32", cached_activations_path=str(cache),
                             exclude_special_tokens=exclude)
    batches = []
    while True:
        try:
            batches.append(store.get_filtered_llm_batch(raise_on_epoch_end=True))
        except StopIteration:
            return torch.cat(batches)


def main(model_dir: Path, root: Path) -> None:
    model = hooked_tiny(model_dir)
    tokens = windows(model.tokenizer)
    cache = root / "cache"
    shutil.rmtree(root, ignore_errors=True)
    d_in = model.cfg.d_model
    cfg = CacheActivationsRunnerConfig(
        dataset_path="tiny-sentences", model_name="tiny", model_batch_size=BATCH, hook_name=HOOK, d_in=d_in,
        training_tokens=WINDOWS * CTX, context_size=CTX, new_cached_activations_path=str(cache), shuffle=False,
        dtype="float32", device="cpu", buffer_size_gb=WINDOWS // SHARDS * CTX * d_in * 4 / 1e9, prepend_bos=False,
        streaming=False)
    runner_module.load_model = lambda **_: model  # the tiny model, built above (SAELens would fetch by name)
    CacheActivationsRunner(cfg, override_dataset=Dataset.from_dict({"tokens": tokens})).run()

    everything = read_back(model, cache, None)
    expected = {
        "activations": read_back(model, cache, torch.tensor(EXCLUDED)),
        "excluded_token_ids": torch.tensor(EXCLUDED),
        "all_activations": everything,
        "token_ids": torch.tensor(tokens, dtype=torch.int32),
        "bos_only": read_back(model, cache, torch.tensor(get_special_token_ids(model.tokenizer))),
    }
    assert len(everything) == WINDOWS * CTX
    save_file({k: v.contiguous() for k, v in expected.items()}, str(root / "expected.safetensors"),
              metadata={"sae_lens": sae_lens.__version__, "hook": HOOK})
    (root / "made_by.json").write_text(json.dumps({
        "script": "scripts/saelens_compat/make_cache_fixture.py", "sae_lens": sae_lens.__version__,
        "model": "tests/conftest.py build_tiny_model (GPT-2, d_model 32)", "hook": HOOK, "context_size": CTX,
        "windows": WINDOWS, "excluded_token_ids": EXCLUDED}, indent=2) + "\n")
    print(f"{root}: {WINDOWS} windows of {CTX} at {HOOK}, {len(expected['activations'])} rows kept, written and "
          f"read back by sae-lens {sae_lens.__version__}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
