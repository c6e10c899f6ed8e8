"""SAELens layouts by cfg.json architecture name: each variant file registers the layout(s) it owns.

A layout says what an export in it means: its SAE architecture name, SAELens's names for its transcoders (or
saelab-named ones, saelab_<name>[_skip]_transcoder, where SAELens has none), and the encoder that computes the
latents from the loaded tensors on raw activations (saelens_format.ExportedSAE runs it for saelab-eval and the
dashboard). What a variant's parameters become in its layout, and back, is the variant's (saelens_tensors.py).
A variant that writes another's layout (BatchTopK writes "jumprelu") names it and registers nothing.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

# (the export's tensors, its cfg.json, the activations already centred as apply_b_dec_to_input says) -> latents
Encoder = Callable[[Mapping[str, Tensor], Mapping[str, Any], Tensor], Tensor]


@dataclass(frozen=True)
class SAELensLayout:
    """One SAELens architecture: its names in cfg.json and its encoder on loaded tensors."""

    architecture: str  # cfg.json's architecture for an SAE in this layout
    encode: Encoder
    transcoder: str | None = None  # SAELens's name for a transcoder with this encoder (None: saelab-named)
    skip_transcoder: str | None = None  # ... and for one with a skip connection

    def transcoder_architecture(self, skip: bool) -> str:
        named = self.skip_transcoder if skip else self.transcoder
        return named if named is not None else saelab_transcoder_name(self.architecture, skip)

    @property
    def names(self) -> tuple[str, str, str]:
        """Every cfg.json architecture this layout's encoder reads: the SAE's and its two transcoders'."""
        return self.architecture, self.transcoder_architecture(False), self.transcoder_architecture(True)


_LAYOUTS: dict[str, SAELensLayout] = {}  # every cfg.json architecture name -> the layout it belongs to


def saelab_transcoder_name(architecture: str, skip: bool) -> str:
    """A transcoder SAELens has no layout for: saelab_topk_transcoder, saelab_gated_untied_skip_transcoder, ..."""
    return f"saelab_{architecture.removeprefix('saelab_')}{'_skip' if skip else ''}_transcoder"


def register_layout(layout: SAELensLayout) -> SAELensLayout:
    """Declare a layout (a variant file does, at import); a name another layout already claims is refused."""
    for name in layout.names:
        owner = _LAYOUTS.get(name)
        if owner is not None and owner.architecture != layout.architecture:  # the same one again: a reload
            raise ValueError(f"SAELens architecture {name!r} is claimed by layouts {owner.architecture!r} and "
                             f"{layout.architecture!r}")
        _LAYOUTS[name] = layout
    return layout


@functools.cache
def _import_variant_files() -> None:
    """Import every module of saelab.saes once, so each built-in variant file has registered its layouts (a
    variant from outside saelab registers its own when its module is imported)."""
    import saelab.saes as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def find_layout(architecture: str) -> SAELensLayout | None:
    """The layout a cfg.json architecture (an SAE's or a transcoder's) belongs to; None if no variant declares it."""
    if architecture not in _LAYOUTS:
        _import_variant_files()
    return _LAYOUTS.get(architecture)


def known_architectures() -> list[str]:
    """The SAE architectures whose encoders saelab runs (each also as its transcoders), sorted."""
    _import_variant_files()
    return sorted({layout.architecture for layout in _LAYOUTS.values()})


def transcoder_architecture(architecture: str, skip: bool) -> str:
    """A transcoder's cfg.json architecture for an SAE architecture: its layout's name for it (SAELens's where it
    has one: transcoder, skip_transcoder, jumprelu_transcoder, ...), else a saelab-named one."""
    layout = find_layout(architecture)
    return layout.transcoder_architecture(skip) if layout is not None else saelab_transcoder_name(architecture, skip)
