"""An SAE's parameters as the tensors of its SAELens layout, for raw activations, and back (init_from).

Biases and thresholds scale with the input's normalisation scale, weights do not (SPEC section 0); a
transcoder's output side also carries the ratio of its target's scale to its input's. Each variant says what its
parameters are in its layout (export_tensors, export_config) and, where a default reading would be wrong, how to
read them back (import_threshold); the layout's names and encoder are in saelens_layout.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.saes.decoder_rescale import raw_parameter
from saelab.saes.saelens_layout import transcoder_architecture
from saelab.sites import column_scales


class SAELensTensors(nn.Module):
    """Export and import in SAELens's layout (a base of saes/base.SAE, which holds the attributes below)."""

    saelens_architecture: ClassVar[str] = "standard"  # the layout written (a name in saelens_layout's registry)
    transcoder: bool
    d_out: int
    d_in: int
    n_sites: int
    W_skip: nn.Parameter | None

    def export_tensors(self, scale: float) -> dict[str, Tensor]:
        """SAELens tensors for a model that takes raw activations x_raw = scale * x.

        Biases and thresholds scale by `scale`, weights do not, so latents scale by `scale` too.
        """
        raise NotImplementedError

    def standard_tensors(self, scale: float) -> dict[str, Tensor]:
        """W_enc, W_dec, b_enc, b_dec with the biases scaled: the layout ReLU, JumpReLU and TopK share."""
        return {
            "W_enc": self.W_enc.detach().clone(),
            "W_dec": self.W_dec.detach().clone(),
            "b_enc": self.b_enc.detach() * scale,
            "b_dec": self.b_dec.detach() * scale,
        }

    def export_config(self) -> dict[str, Any]:
        """Architecture-specific cfg.json fields (beyond d_in, d_sae, ...)."""
        return {"architecture": self.saelens_architecture}

    def exported_tensors(self, scale: float, target_scale: float | None = None,
                         site_scales: Sequence[float] | None = None) -> dict[str, Tensor]:
        """export_tensors for raw inputs x_raw = scale * x; a transcoder's output side then for raw targets
        t_raw = target_scale * t. The latents carry `scale` (see export_tensors), so with r = target_scale / scale
        the output side becomes W_dec' = r W_dec, b_dec' = target_scale b_dec and W_skip' = r W_skip. A
        crosscoder's sites each have a scale C_s (`site_scales`; `scale` is the first's): crosscoder_sites."""
        tensors = self.export_tensors(scale)
        if self.n_sites > 1:
            return self.crosscoder_sites(tensors, scale, site_scales, inverse=False)
        if not self.transcoder:
            return tensors
        ratio = (target_scale if target_scale is not None else scale) / scale
        tensors["W_dec"] = tensors["W_dec"] * ratio
        tensors["b_dec"] = tensors["b_dec"] * ratio  # export_tensors scaled it by `scale`
        if self.W_skip is not None:
            tensors["W_skip"] = self.W_skip.detach() * ratio
        return tensors

    def crosscoder_sites(self, tensors: dict[str, Tensor], scale: float, site_scales: Sequence[float] | None,
                         inverse: bool) -> dict[str, Tensor]:
        """A crosscoder's per-site scales folded in (or out, `inverse`): with r_s = C_s / scale for the columns of
        site s, W_enc' = W_enc / r (rows), W_dec' = W_dec r and b_dec' = b_dec r (columns). The latents still carry
        `scale`, and x_raw^s = C_s x^s then gives the same latents and x_hat_raw^s = C_s x_hat^s."""
        if site_scales is None or len(site_scales) != self.n_sites:
            raise ValueError(f"a crosscoder over {self.n_sites} sites exports with one scale a site")
        ratio = column_scales(site_scales, self.d_in // self.n_sites) / scale
        ratio = 1 / ratio if inverse else ratio
        out = dict(tensors)
        out["W_enc"] = tensors["W_enc"] / ratio.to(tensors["W_enc"]).unsqueeze(1)
        out["W_dec"] = tensors["W_dec"] * ratio.to(tensors["W_dec"])
        out["b_dec"] = tensors["b_dec"] * ratio.to(tensors["b_dec"])
        return out

    @torch.no_grad()
    def import_tensors(self, tensors: Mapping[str, Tensor], scale: float, target_scale: float | None = None,
                       site_scales: Sequence[float] | None = None) -> None:
        """The inverse of exported_tensors (init_from): biases and thresholds back to the normalised scale
        (/ scale), a transcoder's output side back by r = target_scale / scale, a crosscoder's sites back by
        theirs (crosscoder_sites); weights as they are. Parameters are matched by name; a threshold goes through
        import_threshold (variants keep it their own way)."""
        expected = self.exported_tensors(scale, target_scale, site_scales)
        if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
            found = {k: tuple(v.shape) for k, v in tensors.items()}
            raise ConfigError("init_from", found, "the tensors this SAE exports: "
                              + str({k: tuple(v.shape) for k, v in expected.items()}))
        if self.n_sites > 1:
            tensors = self.crosscoder_sites({k: v.float() for k, v in tensors.items()}, scale, site_scales, True)
        ratio = (target_scale if target_scale is not None else scale) / scale if self.transcoder else 1.0
        for name, value in sorted(tensors.items(), key=lambda item: item[0] == "threshold"):  # threshold last: its
            value = value.to(torch.float32)                                            # unit may read the weights
            if name.startswith("b_") or name == "threshold":
                value = value / scale
            if name in ("W_dec", "b_dec", "W_skip"):
                value = value / ratio
            if name == "threshold":
                self.import_threshold(value)
            else:
                raw_parameter(self, name).copy_(value)  # rescaled: exact for unit-norm decoder rows

    def import_threshold(self, threshold: Tensor) -> None:
        """Set the per-latent threshold (normalised scale) from an export; variants with one override this."""
        raise ConfigError("init_from", "threshold", f"no threshold tensor for {type(self).__name__}")

    def exported_config(self) -> dict[str, Any]:
        """export_config, with a transcoder's SAELens architecture (transcoder, skip_transcoder,
        jumprelu_transcoder, jumprelu_skip_transcoder) and d_out; a transcoder SAELens has no layout for gets a
        saelab-named one (e.g. saelab_topk_transcoder), as the untied Gated SAE does."""
        config = self.export_config()
        if not self.transcoder:
            return config
        return {**config, "architecture": transcoder_architecture(config["architecture"], self.W_skip is not None),
                "d_out": self.d_out}
