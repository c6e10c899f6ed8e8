"""The knobs every variant shares (SAEConfig), and their checks; a variant's Config subclasses it."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.errors import ConfigError, check_bool, check_choice, check_positive


@dataclass
class SAEConfig:
    """Knobs shared by every variant. Variants subclass this and add their own fields."""

    d_in: int
    d_sae: int | None = None  # number of latents; null = round(expansion_factor * d_in)
    expansion_factor: float | None = 8.0
    sparsity_coefficient: float = 0.0  # lambda, on the summed-over-dimensions MSE scale
    sparsity_warmup_steps: int = 0  # linear warm-up of lambda from 0
    target_l0: float | None = None  # adapt lambda during training until the batch L0 is this (SAEModule)
    decoder_constraint: str = "unit_norm"  # unit_norm | none | rescale (the TopK family: decoder_rescale.py)
    decoder_init_norm: float = 1.0  # norm of each decoder row at initialisation
    apply_b_dec_to_input: bool = True  # the encoder sees x - b_dec (SAEs; a transcoder's b_dec is the target's)
    d_out: int | None = None  # output width: null = an SAE (reconstructs its input); set = a transcoder
    skip: bool = False  # transcoders: add an affine skip connection W_skip x to the prediction (skip-transcoder)
    sites: int = 1  # sites the input concatenates, each d_in wide: > 1 is a crosscoder (filled in from model.hook)
    cross_layer: bool = True  # a transcoder over several layers: latents write their layer and every later one (CLT)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field. Subclasses extend this and call super()."""
        check_positive("sae.d_in", self.d_in, integer=True)
        if self.d_sae is None:
            if self.expansion_factor is None:
                raise ConfigError("sae.d_sae", None, "an integer, or set sae.expansion_factor")
            check_positive("sae.expansion_factor", self.expansion_factor)
        else:
            check_positive("sae.d_sae", self.d_sae, integer=True)
        check_positive("sae.sparsity_coefficient", self.sparsity_coefficient, allow_zero=True)
        check_positive("sae.sparsity_warmup_steps", self.sparsity_warmup_steps, allow_zero=True, integer=True)
        if self.target_l0 is not None:
            check_positive("sae.target_l0", self.target_l0)
        check_choice("sae.decoder_constraint", self.decoder_constraint, ("unit_norm", "none", "rescale"))
        check_positive("sae.decoder_init_norm", self.decoder_init_norm)
        if self.d_out is not None:
            check_positive("sae.d_out", self.d_out, integer=True)
        check_bool("sae.skip", self.skip)
        if self.skip and self.d_out is None:
            raise ConfigError("sae.skip", self.skip, "false for an SAE (a skip connection needs a transcoder: set "
                              "model.target_hook)")
        check_positive("sae.sites", self.sites, integer=True)
        check_bool("sae.cross_layer", self.cross_layer)
        if self.sites > 1 and self.d_out is not None and self.width % self.sites:
            raise ConfigError("sae.d_sae", self.width, f"a multiple of the {self.sites} layers a cross-layer "
                              "transcoder reads (each layer has d_sae / layers latents)")

    def scale_dependent(self) -> dict[str, int]:
        """Fields given in units of inputs with E||x||^2 = 1 (data.normalize=unit_mean_squared_norm), with the
        power of the input scale s they follow (SPEC section 0: pre-activations, thresholds and bandwidths scale
        by s, the MSE by s^2, so an L1 coefficient by s and an L0 coefficient by s^2). Variants extend it."""
        return {}

    def require_free_decoder_norms(self, penalty: str) -> None:
        """A penalty weighted by ||d_i|| (ri_l1, tanh) equals its unweighted form when the unit-norm constraint
        holds every ||d_i|| at 1, so a sweep over both would report one method twice: reject the pairing."""
        if self.decoder_constraint == "unit_norm":
            raise ConfigError("sae.sparsity", penalty, "it with sae.decoder_constraint=none (it weights latents "
                              "by ||d_i||, which decoder_constraint=unit_norm fixes at 1)")

    @property
    def width(self) -> int:
        """d_sae; from expansion_factor: round(expansion_factor * d_in), per layer for a cross-layer transcoder
        (so it has as many latents as the per-layer transcoders it replaces)."""
        if self.d_sae is not None:
            return int(self.d_sae)
        layers = self.sites if self.d_out is not None else 1
        return layers * max(1, round(float(self.expansion_factor) * self.d_in))
