"""The SAE contract that every variant implements, and the factory that builds one from its config.

The LightningModule only talks to this interface: it sums the named loss terms of `training_loss`,
schedules the coefficients named in `scheduled_coefficients`, applies the decoder constraint and records
which latents fired. Adding a variant is one Python file (a subclass + its `Config`) and one YAML file.

The contract's other parts have modules of their own, whose names stay importable from here: the shared knobs
(config.SAEConfig), what a training forward returns (train_step.TrainStep, squared_error), the dead-latent
counters (dead_latents) and the SAELens layout's tensors (saelens_tensors; the layouts: saelens_layout).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.kernels.block_products import DENSE
from saelab.saes.config import SAEConfig
from saelab.saes.cross_layer import LayerStructure
from saelab.saes.dead_latents import DeadLatentCounters, DeadRead
from saelab.saes.decoder_rescale import rescale_by_decoder_norm
from saelab.saes.saelens_tensors import SAELensTensors
from saelab.saes.train_step import SparseLatents, TrainStep, squared_error
from saelab.sections import typed_value

__all__ = ["SAE", "DeadRead", "SAEConfig", "SparseLatents", "TrainStep", "build_sae", "squared_error"]


class SAE(DeadLatentCounters, SAELensTensors):
    """Base class. Weights follow SAELens's layout: W_enc [d_in, d_sae], W_dec [d_sae, d_out].

    An SAE reconstructs its input (d_out = d_in). A transcoder (cfg.d_out set) predicts another activation, the
    target, from its input: the same encoder and decoder, a different target in the loss, and b_dec lives in the
    target's space, so the encoder never subtracts it. A skip-transcoder adds W_skip x ([d_out, d_in], from 0),
    so the latents explain only what the affine map cannot: every variant trains the dictionary against
    `reconstruction_target` = target - W_skip x (whose gradient reaches W_skip) and its file never sees the skip.
    """

    Config: ClassVar[type[SAEConfig]] = SAEConfig
    recipe_adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    rescalable_decoder: ClassVar[bool] = False  # takes sae.decoder_constraint=rescale (decoder_rescale.py)
    # encode() decides each latent from its own pre-activation (so a CLT's layer l output needs layers <= l alone)
    elementwise_encoder: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.n_sites = int(cfg.sites)  # a crosscoder's sites (saelab.sites): its input is their concatenation
        self.d_in, self.d_sae = int(cfg.d_in) * self.n_sites, cfg.width
        self.d_out = int(cfg.d_out) * self.n_sites if cfg.d_out is not None else self.d_in
        # A transcoder over several layers (a CLT): weights kept to its block shape (cross_layer.py).
        self.layer_structure = (LayerStructure(self.n_sites, bool(cfg.cross_layer))
                                if cfg.d_out is not None and self.n_sites > 1 else None)
        # The fused dense step's matmuls (kernels/block_products.py): a CLT's over its weight blocks alone.
        self.products = self.layer_structure.products if self.layer_structure is not None else DENSE
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, self.d_in)) if cfg.skip else None
        self.init_dead_latent_counters()  # tokens_since_fired, tokens_seen: saved in checkpoints

    # -- initialisation -------------------------------------------------------------------------
    def init_decoder_and_tied_encoder(self) -> Tensor:
        """Kaiming-uniform decoder rows scaled to `decoder_init_norm`; returns W_dec^T for W_enc (a transcoder
        whose output width differs from its input's gets an encoder drawn the same way instead)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec)
            self.W_dec.mul_(self.cfg.decoder_init_norm / self.W_dec.norm(dim=1, keepdim=True))
            if self.d_out == self.d_in:
                return self.W_dec.t().clone().contiguous()
            W_enc = nn.init.kaiming_uniform_(torch.empty(self.d_sae, self.d_in))
            return (W_enc * (self.cfg.decoder_init_norm / W_enc.norm(dim=1, keepdim=True))).t().contiguous()

    # -- the contract -----------------------------------------------------------------------------
    @property
    def transcoder(self) -> bool:
        return self.cfg.d_out is not None

    @property
    def centres_input(self) -> bool:
        """Whether the encoder sees x - b_dec: apply_b_dec_to_input, for SAEs (a transcoder's b_dec is the
        target's bias, as in SAELens, which refuses the flag for transcoders)."""
        return bool(self.cfg.apply_b_dec_to_input) and not self.transcoder

    def site_decoder_norms(self) -> Tensor:
        """[d_sae, sites]: each latent's decoder norm at each written site (one column for a one-site SAE or
        transcoder; a CLT's: one per output layer)."""
        sites = self.n_sites if self.layer_structure is not None or not self.transcoder else 1
        return self.W_dec.view(self.d_sae, sites, self.d_out // sites).norm(dim=-1)

    def decoder_norms(self) -> Tensor:
        """[d_sae]: the weight a norm-weighted penalty (ri_l1, tanh) gives each latent: ||d_i||; for a crosscoder
        the sum over sites of its decoder norms (Lindsey et al. 2024), so that a latent pays for every site it
        writes to; for a CLT the norm of its decoders to every layer, concatenated (Ameisen et al. 2025)."""
        if self.n_sites == 1 or self.layer_structure is not None:
            return self.W_dec.norm(dim=1)
        return self.site_decoder_norms().sum(-1)

    def centre(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.centres_input else x

    def reconstruction_target(self, x: Tensor, target: Tensor | None) -> Tensor:
        """What the dictionary's output is trained to match: the input x (an SAE) or the target (a transcoder),
        less the skip path's prediction W_skip x (which then learns from the same loss)."""
        out = x if target is None else target
        return out if self.W_skip is None else out - self.skip_prediction(x)

    def skip_prediction(self, x: Tensor) -> Tensor:
        return x @ self.W_skip.t().to(x.dtype)

    def encoder_preacts(self, x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        """(x - b_dec) W_enc + b_enc, computed as x W_enc + (b_enc - b_dec W_enc) outside autocast.

        Equal, but b_dec's encoder gradient then costs a vector-matrix product instead of a third
        [B, d_in] x [d_in, d_sae] matmul (about a sixth of a dense training step). Under autocast the
        subtraction could cancel in low precision, so there the input is centred first.
        """
        if not self.centres_input or torch.is_autocast_enabled(x.device.type):
            return self.centre(x) @ W_enc + b_enc
        return x @ W_enc + self.folded_bias(W_enc, b_enc)

    def folded_bias(self, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        """b_enc - b_dec W_enc (or b_enc without centring): the encoder bias once b_dec is folded in."""
        return b_enc - self.b_dec @ W_enc if self.centres_input else b_enc

    def fused_ok(self, x: Tensor) -> bool:
        """Whether the fused float kernels (kernels/fused_relu.py, fused_gated.py) may run: a 2-D batch, no autocast."""
        return x.dim() == 2 and not torch.is_autocast_enabled(x.device.type)

    def workspace(self, name: str, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A [B, d_sae] buffer (x's dtype unless given; x's device) reused across steps by the fused kernels.

        Fresh 48 MiB tensors are above glibc's largest mmap threshold (32 MiB), so each would be mmapped
        and page-faulted in on every step; reusing the buffer skips that. A buffer holding a step's latents
        is overwritten by the next step's forward (autograd's version check rejects a backward through a
        graph whose buffer was overwritten, so nothing is silently wrong).
        """
        shape, dtype = (x.shape[0], self.d_sae), dtype or x.dtype
        cache = self.__dict__.setdefault("_workspace", {})
        buf = cache.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != x.device:
            buf = cache[name] = x.new_empty(shape, dtype=dtype)
        return buf

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def output(self, x: Tensor, f: Tensor) -> Tensor:
        """The output for input x with latents f = encode(x): decode(f), plus a skip-transcoder's W_skip x."""
        out = self.decode(f)
        return out if self.W_skip is None else out + self.skip_prediction(x)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The dictionary's output for x (variants with a faster path than decode(encode(x)) override this)."""
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of x (an SAE) or the prediction of the target from x (a transcoder)."""
        out = self.reconstruct(x)
        return out if self.W_skip is None else out + self.skip_prediction(x)

    def training_loss(self, x: Tensor, coefficients: Mapping[str, float], target: Tensor | None = None
                      ) -> TrainStep:
        """The named loss terms for input x; `target` is a transcoder's target activation (None: an SAE).
        Variants reconstruct `self.reconstruction_target(x, target)`."""
        raise NotImplementedError

    @property
    def scheduled_coefficients(self) -> dict[str, tuple[float, int]]:
        """name -> (final value, linear warm-up steps). The module passes the scheduled values back."""
        return {"sparsity": (float(self.cfg.sparsity_coefficient), int(self.cfg.sparsity_warmup_steps))}

    # -- the input scale -----------------------------------------------------------------------------
    def adapt_to_input_scale(self, rms: float) -> dict[str, tuple[float, float]]:
        """Convert the scale-dependent knobs (SAEConfig.scale_dependent) from units of E||x||^2 = 1 to inputs
        whose root mean squared norm is `rms` (about sqrt(d_in) under data.normalize=sqrt_d_model; C under
        none), before training. Returns {field: (given, used)} for the fields it changed."""
        changed = {}
        if rms == 1.0:
            return changed
        for name, power in self.cfg.scale_dependent().items():
            given = float(getattr(self.cfg, name))
            setattr(self.cfg, name, given * float(rms) ** power)
            changed[name] = (given, getattr(self.cfg, name))
        self.reinitialise_scaled()
        return changed

    def reinitialise_scaled(self) -> None:
        """Re-initialise parameters whose initial value is a scale-dependent knob (JumpReLU's threshold)."""

    # -- around the optimiser step (the module calls these; variants may extend them) ---------------
    def before_optimizer_step(self) -> None:
        """Called after backward, before the step: a CLT's zero blocks keep zero gradients; the unit-norm
        constraint's gradient projection."""
        if self.layer_structure is not None:
            self.layer_structure.mask_gradients(self)
        if self.unit_norm_decoder:
            self.remove_parallel_decoder_grad()

    def after_optimizer_step(self) -> None:
        """Called after each step: renormalise the decoder (variants add e.g. threshold projection)."""
        if self.unit_norm_decoder:
            self.normalise_decoder()

    @property
    def signed_sparsity_coefficient(self) -> bool:
        """Whether a negative sparsity coefficient is meaningful (l0_control.signed): only for a penalty that counts
        active latents (JumpReLU's L0), where it rewards firing and only moves thresholds; a negative L1 would
        reward unbounded activations. Also the controller's recipe: signed where it is meaningful."""
        return False

    @property
    def recipe_lr_warmup_steps(self) -> int:
        """optim.lr_warmup_steps when it is null: 20 steps from 0.1 lr, none for a rescaled decoder. Adam moves its
        raw rows (norm 0.1 at the start) by a large angle per step, and a warm-up measured worse there: TopK on
        the 8k SynthSAEBench world, mcc 0.538 with it against 0.646 without (docs/RESULTS.md)."""
        return 0 if self.cfg.decoder_constraint == "rescale" else 20

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.decoder_constraint == "unit_norm"

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """g_i <- g_i - (g_i . d_i) d_i for unit-norm rows d_i, so the step does not change their norm."""
        grad = self.W_dec.grad
        if grad is not None:
            parallel = torch.linalg.vecdot(grad, self.W_dec, dim=1).unsqueeze(1)
            grad.addcmul_(parallel, self.W_dec, value=-1.0)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def build_sae(sae_cfg: Mapping[str, Any]) -> SAE:
    """Build and validate an SAE from its config group (`_target_` names the SAE class)."""
    cls, config = sae_config(sae_cfg)
    sae = cls(config)
    if sae.layer_structure is not None:
        sae.layer_structure.apply(sae)
    if config.decoder_constraint == "rescale":
        rescale_by_decoder_norm(sae)
    return sae


def sae_config(sae_cfg: Mapping[str, Any]) -> tuple[type[SAE], SAEConfig]:
    """The SAE class `_target_` names and its validated Config, without building the SAE (no weights)."""
    from hydra.utils import get_class

    cfg = dict(sae_cfg)
    target = cfg.pop("_target_", None)
    try:
        cls = get_class(str(target))
    except Exception:
        raise ConfigError("sae._target_", target, "an importable SAE class path") from None
    if not (isinstance(cls, type) and issubclass(cls, SAE)):
        raise ConfigError("sae._target_", target, "a subclass of saelab.saes.SAE")
    config_cls = cls.Config
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    for key, value in cfg.items():
        if key not in names:
            raise ConfigError(f"sae.{key}", value, f"a field of {cls.__name__}: " + ", ".join(names))
    config = config_cls(**{k: typed_value(f"sae.{k}", v, hints.get(k), integral_floats=True) for k, v in cfg.items()})
    config.validate()
    if config.decoder_constraint == "rescale" and not cls.rescalable_decoder:
        raise ConfigError("sae.decoder_constraint", "rescale", f"unit_norm or none for {cls.__name__} (rescale is "
                          "the TopK family's: topk, batchtopk, matryoshka_batchtopk)")
    return cls, config
