"""The SAE contract that every variant implements, and the factory that builds one from its config.

The LightningModule only talks to this interface: it sums the named loss terms of `training_loss`,
schedules the coefficients named in `scheduled_coefficients`, applies the decoder constraint and records
which latents fired. Adding a variant is one Python file (a subclass + its `Config`) and one YAML file.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError, check_bool, check_choice, check_positive
from saelab.kernels.reconstruction import SquaredError


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
    apply_b_dec_to_input: bool = True  # the encoder sees x - b_dec (SAEs; a transcoder's b_dec is the target's)
    d_out: int | None = None  # output width: null = an SAE (reconstructs its input); set = a transcoder
    skip: bool = False  # transcoders: add an affine skip connection W_skip x to the prediction (skip-transcoder)

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
        if self.d_out is not None:
            check_positive("sae.d_out", self.d_out, integer=True)
        check_bool("sae.skip", self.skip)
        if self.skip and self.d_out is None:
            raise ConfigError("sae.skip", self.skip, "false for an SAE (a skip connection needs a transcoder: set "
                              "model.target_hook)")

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


# SAELens's transcoder layouts: (the SAE's architecture, with a skip connection) -> the transcoder's.
TRANSCODER_LAYOUTS = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}
SAELENS_ARCHITECTURES = ("standard", "gated", "jumprelu", "topk")  # the rest are saelab-named (saelab_...)


def transcoder_architecture(architecture: str, skip: bool) -> str:
    """A transcoder's cfg.json architecture: SAELens's layout where it has one, else a saelab-named one
    (saelab_topk_transcoder, saelab_gated_skip_transcoder, ...), as the untied Gated SAE gets."""
    base = architecture.removeprefix("saelab_")
    return TRANSCODER_LAYOUTS.get((architecture, skip), f"saelab_{base}{'_skip' if skip else ''}_transcoder")


def encoder_architecture(architecture: str) -> str:
    """The inverse: the SAE architecture whose encoder a cfg.json architecture uses (an SAE's: itself)."""
    for (base, _), name in TRANSCODER_LAYOUTS.items():
        if name == architecture:
            return base
    if architecture.startswith("saelab_") and architecture.endswith("_transcoder"):
        base = architecture.removeprefix("saelab_").removesuffix("_transcoder").removesuffix("_skip")
        return base if base in SAELENS_ARCHITECTURES else f"saelab_{base}"
    return architecture


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


@dataclass(frozen=True)
class DeadRead:
    """tokens_since_fired as a logging step read it (refresh_dead_bound): its maximum and, for one dead window,
    the distinct values of min(counter, window), ascending, each with how many latents are at least that."""

    max_since_fired: int
    window: int | None = None
    values: tuple[int, ...] = ()
    at_least: tuple[int, ...] = ()

    def possibly_dead(self, tokens_since: int) -> int:
        """Latents that may have reached the window `tokens_since` tokens after the read: a counter grows by at most
        the tokens since (or resets), so only those that were at window - tokens_since or more."""
        i = bisect.bisect_left(self.values, self.window - tokens_since)
        return self.at_least[i] if i < len(self.values) else 0


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """E_b ||x - x_hat||^2, summed over dimensions (SPEC section 0).

    In float training (no autocast, same dtypes) this is fused.SquaredError: the same value in a third of the
    passes over [B, d_in]."""
    if x.dtype == x_hat.dtype and not torch.is_autocast_enabled(x.device.type):
        return SquaredError.apply(x_hat, x)
    return (x_hat - x).pow(2).sum(-1).mean()


class SAE(nn.Module):
    """Base class. Weights follow SAELens's layout: W_enc [d_in, d_sae], W_dec [d_sae, d_out].

    An SAE reconstructs its input (d_out = d_in). A transcoder (cfg.d_out set) predicts another activation, the
    target, from its input: the same encoder and decoder, a different target in the loss, and b_dec lives in the
    target's space, so the encoder never subtracts it. A skip-transcoder adds W_skip x ([d_out, d_in], from 0),
    so the latents explain only what the affine map cannot: every variant trains the dictionary against
    `reconstruction_target` = target - W_skip x (whose gradient reaches W_skip) and its file never sees the skip.
    """

    Config: ClassVar[type[SAEConfig]] = SAEConfig
    saelens_architecture: ClassVar[str] = "standard"
    recipe_adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.d_in, self.d_sae = int(cfg.d_in), cfg.width
        self.d_out = int(cfg.d_out) if cfg.d_out is not None else self.d_in
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, self.d_in)) if cfg.skip else None
        # Tokens seen since each latent last fired: dead-latent bookkeeping, saved in checkpoints.
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.long))
        # Host-side bounds on them (none_dead, dead_bound): unknown until a logging step reads the counters
        # (refresh_dead_bound), so counters written in place before then (a broadcast, a test) are never missed.
        self._dead_read: DeadRead | None = None
        self._tokens_since_read = 0
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

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
        """Whether the fused float kernels (kernels/fused.py) may run: a 2-D batch, no autocast."""
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
        self._tokens_since_read += n_tokens

    def dead_count_window(self) -> int | None:
        """The dead window whose count of dead latents a step wants bounded on the host (dead_bound: TopK's AuxK
        sizes its selection by it); None: only the counters' maximum is read."""
        return None

    def refresh_dead_bound(self) -> None:
        """Read the counters' maximum and, for dead_count_window, how many latents are how close to it (a host
        synchronisation: logging steps call this)."""
        counters, window = self.tokens_since_fired, self.dead_count_window()
        if not self.d_sae:
            read = DeadRead(0)
        elif window is None:
            read = DeadRead(int(counters.max()))
        else:  # at most window / batch + 2 distinct values while every batch has the same size
            values, counts = counters.clamp(max=window).unique(sorted=True, return_counts=True)
            host = torch.cat([counters.max().view(1), values, counts]).tolist()
            n = values.numel()
            at_least = list(itertools.accumulate(reversed(host[1 + n:])))[::-1]
            read = DeadRead(host[0], int(window), tuple(host[1:1 + n]), tuple(at_least))
        self._dead_read, self._tokens_since_read = read, 0

    @torch.compiler.disable  # host arithmetic: compiled, each step's new token count would force a recompilation
    def none_dead(self, window_tokens: int) -> bool:
        """True when no latent can be dead (dead_mask all false), proven on the host without reading the device:
        the counters only grow by each batch's tokens (or reset), so their maximum is at most the last read one
        plus the tokens since. False when unproven (the bound is unknown until refresh_dead_bound, and a loaded
        state forgets it); a GPU step then computes what depends on the dead latents in fixed shapes."""
        read = self._dead_read
        return read is not None and read.max_since_fired + self._tokens_since_read < int(window_tokens)

    @torch.compiler.disable  # as none_dead
    def dead_bound(self, window_tokens: int) -> int | None:
        """An upper bound on the number of dead latents (dead_mask(window_tokens).sum()) known on the host, as
        none_dead's: from the last read (for dead_count_window's window) and the tokens since; None if unknown."""
        read = self._dead_read
        if self.none_dead(window_tokens):
            return 0
        if read is None or read.window != int(window_tokens):
            return None
        return read.possibly_dead(self._tokens_since_read)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._dead_read = None  # new counters: the bounds are unknown until read again
        super()._load_from_state_dict(*args, **kwargs)

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

    def exported_tensors(self, scale: float, target_scale: float | None = None) -> dict[str, Tensor]:
        """export_tensors for raw inputs x_raw = scale * x; a transcoder's output side then for raw targets
        t_raw = target_scale * t. The latents carry `scale` (see export_tensors), so with r = target_scale / scale
        the output side becomes W_dec' = r W_dec, b_dec' = target_scale b_dec and W_skip' = r W_skip."""
        tensors = self.export_tensors(scale)
        if not self.transcoder:
            return tensors
        ratio = (target_scale if target_scale is not None else scale) / scale
        tensors["W_dec"] = tensors["W_dec"] * ratio
        tensors["b_dec"] = tensors["b_dec"] * ratio  # export_tensors scaled it by `scale`
        if self.W_skip is not None:
            tensors["W_skip"] = self.W_skip.detach() * ratio
        return tensors

    @torch.no_grad()
    def import_tensors(self, tensors: Mapping[str, Tensor], scale: float, target_scale: float | None = None) -> None:
        """The inverse of exported_tensors (init_from): biases and thresholds back to the normalised scale
        (/ scale), a transcoder's output side back by r = target_scale / scale; weights as they are. Parameters are
        matched by name; a threshold goes through import_threshold (variants keep it their own way)."""
        expected = self.exported_tensors(scale, target_scale)
        if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
            found = {k: tuple(v.shape) for k, v in tensors.items()}
            raise ConfigError("init_from", found, "the tensors this SAE exports: "
                              + str({k: tuple(v.shape) for k, v in expected.items()}))
        ratio = (target_scale if target_scale is not None else scale) / scale if self.transcoder else 1.0
        params = dict(self.named_parameters())
        for name, value in tensors.items():
            value = value.to(torch.float32)
            if name.startswith("b_") or name == "threshold":
                value = value / scale
            if name in ("W_dec", "b_dec", "W_skip"):
                value = value / ratio
            if name == "threshold":
                self.import_threshold(value)
            else:
                params[name].copy_(value)

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
