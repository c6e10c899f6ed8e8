"""sae.decoder_constraint=rescale: SAELens's TopK-family parametrisation (`rescale_acts_by_decoder_norm`).

The decoder V is free; the SAE uses it through its unit rows, and its encoder through columns (and bias) scaled
by the same norms:

    W_dec[i] = V_i / ||V_i||,    W_enc[:, i] = W'_enc[:, i] ||V_i||,    b_enc[i] = b'_enc[i] ||V_i||

(W'_enc, b'_enc, V the trained parameters). The function is that of a unit-norm dictionary, so the variant's
maths, its kernels, its metrics and its export see ordinary unit-norm weights. What changes is training: Adam
moves each raw parameter by about lr per step whatever its scale, so a decoder row initialised at norm 0.1 turns
~10x faster than a unit-norm one (more slowly as its norm grows), and the encoder moves by ~lr ||V_i||.

Only the TopK family takes it (SAE.rescalable_decoder): there k sets the sparsity, so the latents' scale enters
no penalty, and the top-k of the rescaled pre-activations is SAELens's selection.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.utils import parametrize

STEP_NORMS = "_step_decoder_norms"  # ||V_i|| for one training step (weights_once), shared by the three tensors


class ByDecoderNorms(nn.Module):
    """A parametrisation through the decoder rows' norms: the step's (weights_once), else computed."""

    def __init__(self, sae: nn.Module):
        super().__init__()
        self._sae = weakref.ref(sae)  # not a submodule: the SAE owns this parametrisation

    def norms(self, decoder: Tensor | None = None) -> Tensor:
        sae = self._sae()
        shared = getattr(sae, STEP_NORMS, None)
        if shared is not None:
            return shared
        decoder = decoder if decoder is not None else sae.parametrizations.W_dec.original
        return decoder.norm(dim=1).clamp_min(1e-12)


class UnitRows(ByDecoderNorms):
    """W_dec = V / ||V_i||, row by row."""

    def forward(self, raw: Tensor) -> Tensor:
        return raw / self.norms(raw).unsqueeze(1)


class TimesDecoderNorms(ByDecoderNorms):
    """An encoder tensor whose last dimension is the latents ([d_in, d_sae] or [d_sae]) times ||V_i||."""

    def forward(self, raw: Tensor) -> Tensor:
        return raw * self.norms()


def rescale_by_decoder_norm(sae: nn.Module) -> None:
    """Reparametrise `sae` (built, initialised) in place. The current weights become the raw ones, so an SAE
    initialised at decoder norm n starts as SAELens's does: unit rows, encoder and bias times n."""
    parametrize.register_parametrization(sae, "W_dec", UnitRows(sae))
    for name in ("W_enc", "b_enc"):
        parametrize.register_parametrization(sae, name, TimesDecoderNorms(sae))


@contextlib.contextmanager
def weights_once(sae: nn.Module) -> Iterator[None]:
    """A training step's scope: each reparametrised weight is computed once, with its gradient, from one
    computation of the norms (a dense pass over the decoder fewer each, forward and backward: at batch 512 the
    weights' elementwise work is a large part of a sparse TopK step). Computed first inside a variant's no-grad
    selection, torch's cache would hold a tensor that trains nothing: so they are computed here, up front."""
    if not parametrize.is_parametrized(sae):
        yield
        return
    with parametrize.cached():
        setattr(sae, STEP_NORMS, raw_parameter(sae, "W_dec").norm(dim=1).clamp_min(1e-12))
        try:
            for name in sae.parametrizations:
                getattr(sae, name)
            yield
        finally:
            setattr(sae, STEP_NORMS, None)


def variant_class(sae: nn.Module) -> type:
    """The variant's own class (torch's parametrisation derives a class named Parametrized<Variant>)."""
    return type(sae).__bases__[0] if parametrize.is_parametrized(sae) else type(sae)


def raw_parameter(sae: nn.Module, name: str) -> nn.Parameter:
    """The trained tensor behind `name`: the raw one where `sae` is reparametrised, else the parameter itself."""
    if parametrize.is_parametrized(sae, name):
        return getattr(sae.parametrizations, name).original
    return getattr(sae, name)
