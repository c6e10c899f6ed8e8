"""`data=saelens_cache`: activations from a cache SAELens wrote (`CacheActivationsRunner`; read by
saelab.data.saelens_cache), at a local directory or any fsspec URL. No model runs: the cache is the activations.

The config names what the cache must hold, and each is checked against the cache before anything trains, in one
line naming the field: `data.path` (a SAELens cache at all), `data.hook` (its activation column; default
model.hook), `data.d_in` (its width; default model.d_model, and sae.d_in follows it), `data.exclude_token_ids`.

Special tokens. SAELens's ActivationsStore, reading its cache, drops the positions whose `token_ids` entry is in its
`exclude_special_tokens` (off by default; True means the tokenizer's BOS, EOS, PAD, SEP and decoder-start ids) and
drops nothing in a cache without token_ids. saelab filters the same way, by the cache's token_ids, with the set
saelab's own stream excludes: by default (`model`) every special id of the model's tokenizer (BOS, EOS, PAD, CLS,
SEP, UNK, ...; only the tokenizer is loaded), or a list given; a cache without token_ids needs `[]` (nothing could
say which positions are special).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saelab.data.saelens_cache import NotASAELensCache, SAELensCache
from saelab.data.sources.base import DataSource
from saelab.errors import ConfigError, check_count
from saelab.sites import Sites

EXCLUDE_ALLOWED = ("model (the special ids of the model's tokenizer: BOS, EOS, PAD, CLS, SEP, UNK, ...) or a list "
                   "of token ids ([] keeps every position)")


class SAELensCacheSource(DataSource):
    name = "saelens_cache"
    needs_model = False
    d_in_field = "data.d_in"

    def __init__(self, data_cfg: Mapping[str, Any]):
        super().__init__(data_cfg)
        self.path = data_cfg.get("path")
        self.hook = str(data_cfg.get("hook"))
        self.given_d_in = data_cfg.get("d_in")
        self.exclude = data_cfg.get("exclude_token_ids", "model")
        self.tokenizer_cfg = data_cfg.get("tokenizer") or {}  # read only for exclude_token_ids=model

    @functools.cached_property
    def cache(self) -> SAELensCache:
        """The cache at data.path (its metadata: no activation is read here)."""
        if self.path is None:
            raise ConfigError("data.path", None, "a directory or URL holding a SAELens activation cache")
        try:
            return SAELensCache.open(str(self.path))
        except NotASAELensCache as err:
            raise ConfigError("data.path", self.path, f"a directory or URL holding a SAELens activation cache, as "
                              f"CacheActivationsRunner writes it ({err})") from None

    @property
    def d_in(self) -> int | None:
        shape = self.cache.hooks.get(self.hook)
        return shape[1] if shape is not None else None

    @property
    def context_size(self) -> int:
        return self.cache.hooks[self.hook][0]

    def check(self) -> None:
        cache = self.cache
        if self.hook not in cache.hooks:
            raise ConfigError("data.hook", self.hook, f"the cache's hook column ({', '.join(cache.hooks)}; set "
                              "model.hook or data.hook to it)")
        given = check_count("data.d_in", self.given_d_in)
        if given != self.d_in:
            raise ConfigError("data.d_in", given, f"the cache's d_in ({self.d_in} at {self.hook}; set data.d_in or "
                              "model.d_model to it)")
        if self.excluded_ids() and not cache.has_token_ids:
            raise ConfigError("data.exclude_token_ids", self.exclude, "[] for a cache without a token_ids column "
                              "(nothing says which of its positions hold special tokens)")

    def excluded_ids(self) -> frozenset[int]:
        """The token ids whose positions are never trained on (module docstring)."""
        if self.exclude == "model":
            return tokenizer_special_ids(str(self.tokenizer_cfg.get("path") or self.tokenizer_cfg.get("name")))
        values = list(self.exclude) if isinstance(self.exclude, (list, tuple)) or _is_list_config(self.exclude) \
            else None
        if values is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ConfigError("data.exclude_token_ids", self.exclude, EXCLUDE_ALLOWED)
        return frozenset(values)

    def own_key_inputs(self) -> dict[str, Any]:
        location = str(self.path)
        if "://" not in location:
            location = str(Path(location).expanduser().resolve())
        return {"path": location, "fingerprint": self.cache.fingerprint, "files": list(self.cache.files),
                "hook": self.hook, "excluded_token_ids": sorted(self.excluded_ids())}

    def sites(self, model_cfg: Mapping[str, Any]) -> Sites:
        return Sites.of(self.hook)

    def datamodule(self, data_cfg, model, eval_tokens, seed, *, cache_dir, train_tokens, hooks):
        from saelab.data.saelens_cache_datamodule import SAELensCacheDataModule

        return SAELensCacheDataModule(data_cfg, eval_tokens, seed, hooks, self.cache, self.excluded_ids())


def _is_list_config(value: Any) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, ListConfig)


@functools.cache
def tokenizer_special_ids(source: str) -> frozenset[int]:
    """Every special id of the tokenizer at `source` (a directory or a hub name, offline from the HF cache), as
    saelab's own stream excludes them (saelab.data.tokens.SpecialTokens)."""
    from transformers import AutoTokenizer

    from saelab.data.tokens import SpecialTokens

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("data.exclude_token_ids", "model", f"{EXCLUDE_ALLOWED}; the tokenizer {source!r} (data."
                          f"tokenizer.path, else data.tokenizer.name) does not load: {first}") from None
    return SpecialTokens.from_tokenizer(tokenizer).excluded
