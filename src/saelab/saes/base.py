"""The SAE contract that every variant implements, and the factory that builds one from its config.

The LightningModule only talks to this interface: it sums the named loss terms of `training_loss`,
schedules the coefficients named in `scheduled_coefficients`, applies the decoder constraint and records
which latents fired. Adding a variant is one Python file (a subclass + its `Config`) and one YAML file.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError, check_choice, check_positive
from saelab.saes.fused import SquaredError


@dataclass
class SAEConfig:
    """Knobs shared by every variant. Variants subclass this and add their own fields."""

    d_in: int
    d_sae: int | None = None  # number of latents; null = round(expansion_factor * d_in)
    expansion_factor: float | None = 8.0
    sparsity_coefficient: float = 0.0  # lambda, on the summed-over-dimensions MSE scale
    sparsity_warmup_steps: int = 0  # linear warm-up of lambda from 0
    target_l0: float | None = None  # adapt lambda during training until the batch L0 is this (SAEModule)
    decoder_constraint: str = "unit_norm"  # unit_norm | none
    decoder_init_norm: float = 1.0  # norm of each decoder row at initialisation
    apply_b_dec_to_input: bool = True  # the encoder sees x - b_dec

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
        check_choice("sae.decoder_constraint", self.decoder_constraint, ("unit_norm", "none"))
        check_positive("sae.decoder_init_norm", self.decoder_init_norm)

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
        if self.d_sae is not None:
            return int(self.d_sae)
        return max(1, round(float(self.expansion_factor) * self.d_in))


class SparseLatents(Protocol):
    """A batch's latents stored as their active entries (TopK-style variants); see saes/topk.ActiveLatents."""

    batch_size: int

    def dense(self) -> Tensor: ...

    def fired(self) -> Tensor: ...

    def active_count(self) -> Tensor: ...


@dataclass
class TrainStep:
    """What one training forward returns: the named loss terms (summed into the loss) and the latents.

    The latents feed L0 and the dead-latent bookkeeping. A latent is active on a token when it is > 0.
    """

    terms: dict[str, Tensor]
    latents: Tensor | SparseLatents  # [batch, d_sae], or only the active entries (no dense tensor built)
    extras: dict[str, Tensor] = field(default_factory=dict)  # logged as-is, not part of the loss
    fired_mask: Tensor | None = None  # [d_sae] bool, when the forward already found which latents fired

    @property
    def feature_acts(self) -> Tensor:
        """The latents as a dense [batch, d_sae] tensor (built on demand for sparse latents)."""
        return self.latents if isinstance(self.latents, Tensor) else self.latents.dense()

    @property
    def n_tokens(self) -> int:
        return self.latents.shape[0] if isinstance(self.latents, Tensor) else self.latents.batch_size

    def fired(self) -> Tensor:
        """[d_sae] bool: latents active on at least one token. One max-reduction: (f > 0).any(0) would
        write a [batch, d_sae] mask first (about 10x slower on CPU)."""
        if self.fired_mask is not None:
            return self.fired_mask
        if isinstance(self.latents, Tensor):
            return self.latents.detach().amax(0) > 0
        return self.latents.fired()

    def active_count(self) -> Tensor:
        """Active (token, latent) pairs in the batch (an integer scalar)."""
        if isinstance(self.latents, Tensor):  # count_nonzero of a bool mask: summing the mask is ~10x slower
            return torch.count_nonzero(self.latents.detach() > 0)
        return self.latents.active_count()


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """E_b ||x - x_hat||^2, summed over dimensions (SPEC section 0).

    In float training (no autocast, same dtypes) this is fused.SquaredError: the same value in a third of the
    passes over [B, d_in]."""
    if x.dtype == x_hat.dtype and not torch.is_autocast_enabled(x.device.type):
        return SquaredError.apply(x_hat, x)
    return (x_hat - x).pow(2).sum(-1).mean()


class SAE(nn.Module):
    """Base class. Weights follow SAELens's layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in]."""

    Config: ClassVar[type[SAEConfig]] = SAEConfig
    saelens_architecture: ClassVar[str] = "standard"
    recipe_adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.d_in, self.d_sae = int(cfg.d_in), cfg.width
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_in))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        # Tokens seen since each latent last fired: dead-latent bookkeeping, saved in checkpoints.
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    # -- initialisation -------------------------------------------------------------------------
    def init_decoder_and_tied_encoder(self) -> Tensor:
        """Kaiming-uniform decoder rows scaled to `decoder_init_norm`; returns W_dec^T for W_enc."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec)
            self.W_dec.mul_(self.cfg.decoder_init_norm / self.W_dec.norm(dim=1, keepdim=True))
            return self.W_dec.t().clone().contiguous()

    # -- the contract -----------------------------------------------------------------------------
    def centre(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encoder_preacts(self, x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        """(x - b_dec) W_enc + b_enc, computed as x W_enc + (b_enc - b_dec W_enc) outside autocast.

        Equal, but b_dec's encoder gradient then costs a vector-matrix product instead of a third
        [B, d_in] x [d_in, d_sae] matmul (about a sixth of a dense training step). Under autocast the
        subtraction could cancel in low precision, so there the input is centred first.
        """
        if not self.cfg.apply_b_dec_to_input or torch.is_autocast_enabled(x.device.type):
            return self.centre(x) @ W_enc + b_enc
        return x @ W_enc + self.folded_bias(W_enc, b_enc)

    def folded_bias(self, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        """b_enc - b_dec W_enc (or b_enc without centring): the encoder bias once b_dec is folded in."""
        return b_enc - self.b_dec @ W_enc if self.cfg.apply_b_dec_to_input else b_enc

    def fused_ok(self, x: Tensor) -> bool:
        """Whether the fused float kernels (saes/fused.py) may run: a 2-D batch, no autocast."""
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

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def training_loss(self, x: Tensor, coefficients: Mapping[str, float]) -> TrainStep:
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
        """Called after backward, before the step: the unit-norm constraint's gradient projection."""
        if self.unit_norm_decoder:
            self.remove_parallel_decoder_grad()

    def after_optimizer_step(self) -> None:
        """Called after each step: renormalise the decoder (variants add e.g. threshold projection)."""
        if self.unit_norm_decoder:
            self.normalise_decoder()

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

    # -- bookkeeping ---------------------------------------------------------------------------------
    @torch.no_grad()
    def record_fired(self, fired: Tensor, n_tokens: int) -> None:
        """Dead-latent bookkeeping from a [d_sae] mask of the latents that fired in the last `n_tokens` tokens."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)
        self.tokens_seen.add_(n_tokens)

    def dead_mask(self, window_tokens: int) -> Tensor:
        """Latents that have not fired in the last `window_tokens` tokens. Before a window has passed nothing is
        dead: a latent that missed the first batches is not dead, and one that fired early and then stopped is
        dead once a whole window has passed without it (as SAELens's and sparsify's counters)."""
        return self.tokens_since_fired >= int(window_tokens)

    # -- export ------------------------------------------------------------------------------------------
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


def _coerce(value: Any, hint: Any) -> Any:
    """YAML and the CLI turn 2e6 into a float: accept integral floats for int fields."""
    if hint in (int, int | None) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def build_sae(sae_cfg: Mapping[str, Any]) -> SAE:
    """Build and validate an SAE from its config group (`_target_` names the SAE class)."""
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
    config = config_cls(**{k: _coerce(v, hints.get(k)) for k, v in cfg.items()})
    config.validate()
    return cls(config)
