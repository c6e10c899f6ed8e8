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
            if self.W_skip is not None:
                tensors["W_skip"] = self.W_skip.detach().clone()
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
        """Per-site scales folded in (or out, `inverse`) for an SAE over several sites: `site_scales` are the scales
        of the sites read, then (a cross-layer transcoder) of those written. With r_in = C_s / scale for the input
        columns of site s and r_out likewise for the output's, W_enc' = W_enc / r_in (rows; a Gated SAE's W_mag
        too), W_dec' = W_dec r_out, b_dec' = b_dec r_out (columns) and W_skip' = r_out W_skip / r_in. The latents
        still carry `scale`, and x_raw^s = C_s x^s then gives the same latents and x_hat_raw^s = C_s x_hat^s."""
        n, written = self.n_sites, self.n_sites * (2 if self.transcoder else 1)
        if site_scales is None or len(site_scales) != written:
            raise ValueError(f"an SAE over {n} sites exports with one scale a site ({written} scales)")
        r_in = column_scales(site_scales[:n], self.d_in // n) / scale
        r_out = column_scales(site_scales[-n:], self.d_out // n) / scale
        r_in, r_out = (1 / r_in, 1 / r_out) if inverse else (r_in, r_out)
        out = dict(tensors)
        for name in ("W_enc", "W_mag"):
            if name in tensors:
                out[name] = tensors[name] / r_in.to(tensors[name]).unsqueeze(1)
        out["W_dec"] = tensors["W_dec"] * r_out.to(tensors["W_dec"])
        out["b_dec"] = tensors["b_dec"] * r_out.to(tensors["b_dec"])
        if "W_skip" in tensors:
            out["W_skip"] = tensors["W_skip"] * r_out.to(tensors["W_skip"]).unsqueeze(1) / r_in.to(tensors["W_skip"])
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
        one_target = self.transcoder and self.n_sites == 1  # several sites' scales were folded out above
        ratio = (target_scale if target_scale is not None else scale) / scale if one_target else 1.0
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
