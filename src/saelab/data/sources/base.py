"""The interface every data source implements, and how a config names one.

A source owns what decides its activations: its documents (a text source, run through the model) or its samples
(a generated one, no model), the inputs that key its activation cache, the hooks a job reads from it, and its
held-out set (through the datamodule it builds). Nothing outside a source switches on its name.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L

from saelab.data.protocol import StreamDataModule
from saelab.data.tokens import Document
from saelab.errors import ConfigError
from saelab.sites import Sites


class DataSource(ABC):
    """Where activations come from. Subclasses take their fields from the data section (`from_config`)."""

    name: ClassVar[str]  # the source's name: data.source, the label in reports and cache listings
    needs_model: ClassVar[bool] = True  # False: the source makes activations itself (and may know their truth)
    d_in_field: ClassVar[str | None] = None  # where a source without a model sets its activations' width

    @property
    def d_in(self) -> int | None:
        """The activations' width, for a source without a model (a model's hooks say it otherwise)."""
        return None

    @property
    def mean_l0(self) -> float | None:
        """The expected number of true features firing per sample, for a source that knows its world (a
        synthetic one): a variant with no explicit sparsity then trains at it (run/world_sparsity.py)."""
        return None

    def __init__(self, data_cfg: Mapping[str, Any]):
        given = data_cfg.get("source", self.name)
        if given != self.name:
            raise ConfigError("data.source", given, f"{self.name!r}, the name of the source data._target_ names "
                              "(choose another source with data=<source>)")

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any]) -> DataSource:
        return cls(data_cfg)

    @abstractmethod
    def own_key_inputs(self) -> dict[str, Any]:
        """Everything of this source that decides its activations (for a text source: its documents), as
        JSON-serialisable values. Two configurations that differ here must never share a cache."""

    def key_inputs(self) -> dict[str, Any]:
        """own_key_inputs with the source's class, refused when it names nothing (it could not be told apart
        from another configuration of itself)."""
        own = self.own_key_inputs()
        if not own:
            raise ConfigError("data._target_", f"{type(self).__module__}.{type(self).__qualname__}",
                              "a source whose own_key_inputs() names what decides its activations (it returned "
                              "nothing)")
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", **own}

    def check(self) -> None:  # noqa: B027 - optional: most sources have nothing to check
        """Refuse this source's own fields (ConfigError) before anything heavy runs; nothing to check by default."""

    @abstractmethod
    def sites(self, model_cfg: Mapping[str, Any]) -> Sites:
        """The sites a job on this source reads and writes (saelab.sites: an SAE's, a transcoder's, a crosscoder's)."""

    def hooks(self, model_cfg: Mapping[str, Any]) -> list[str]:
        """Every hook a job on this source reads, its input first (a transcoder's target after it)."""
        return self.sites(model_cfg).hooks

    @abstractmethod
    def datamodule(self, data_cfg: Mapping[str, Any], model: Any, eval_tokens: int, seed: int, *,
                   cache_dir: str | None, train_tokens: int | None, hooks: list[str]) -> StreamDataModule:
        """The datamodule serving {hook: batch}, per-hook scales and held-out activations (`eval_acts`): a
        LightningDataModule with every member of data/protocol.StreamDataModule, which run/ reads."""

    def ground_truth(self, datamodule: L.LightningDataModule) -> Any | None:
        """The world whose features made the activations (ground-truth metrics), None when unknown."""
        return None


class TextSource(DataSource):
    """Documents that a model turns into activations at its hooks (saelab.data.datamodule.ActivationDataModule)."""

    @abstractmethod
    def documents(self) -> list[Document]:
        """The corpus, in a fixed order (the held-out split is by a hash of each document)."""

    def sites(self, model_cfg: Mapping[str, Any]) -> Sites:
        from saelab.data.model import configured_hooks

        return Sites.of(configured_hooks(model_cfg), model_cfg.get("target_hook"))

    def datamodule(self, data_cfg, model, eval_tokens, seed, *, cache_dir, train_tokens, hooks):
        from saelab.data.datamodule import ActivationDataModule

        return ActivationDataModule(data_cfg, model, eval_tokens, seed, cache_dir=cache_dir,
                                    train_tokens=train_tokens, hooks=hooks, source=self)


def source_class(target: str) -> type[DataSource]:
    """The class `data._target_` names, refused in one line when it is not importable or not a DataSource."""
    module_name, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, DataSource)):
        raise ConfigError("data._target_", target, "an importable saelab.data.sources.DataSource subclass, e.g. "
                          "saelab.data.sources.pydocs.PyDocs")
    return cls


def build_source(data_cfg: Mapping[str, Any]) -> DataSource:
    """The source a data section configures (its `_target_`), its own fields checked."""
    target = data_cfg.get("_target_")
    if target is None:
        raise ConfigError("data._target_", None, "the class of the data source (see conf/data/*.yaml)")
    source = source_class(str(target)).from_config(data_cfg)
    source.check()
    return source
