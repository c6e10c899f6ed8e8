"""trainer.precision beyond Lightning's values: `auto` (the default: the fast setting for the device) and `tf32`.

auto is tf32 where training runs on CUDA and 32-true elsewhere. tf32 keeps float32 weights, activations and
Adam state, and lets the matmuls run on the tensor cores in TF32 (10-bit mantissa inputs, float32
accumulation): the fused kernels (kernels/fused_*.py, Triton's on CUDA) keep running, where bf16-mixed's
autocast sends the step down the autograd path. On the CPU the setting changes nothing.
"""

from __future__ import annotations

import torch

SAELAB_PRECISIONS = ("auto", "tf32")


def on_cuda(accelerator: object) -> bool:
    """Whether Lightning will train on CUDA with this trainer.accelerator."""
    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve(precision: object, accelerator: object = "auto") -> object:
    """auto -> tf32 on CUDA, else 32-true; anything else as given."""
    if precision == "auto":
        return "tf32" if on_cuda(accelerator) else "32-true"
    return precision


def lightning_precision(precision: object) -> object:
    """What Lightning's Trainer gets: tf32 is its 32-true (the matmul setting is torch's, see apply)."""
    return "32-true" if precision == "tf32" else precision


def for_lightning(trainer_cfg: dict) -> dict:
    """A trainer config as Lightning's Trainer takes it: precision resolved (auto) and mapped (tf32)."""
    given = trainer_cfg["precision"]
    resolved = resolve(given, trainer_cfg["accelerator"])
    return trainer_cfg | {"precision": lightning_precision(resolved)}


def apply(precision: object) -> None:
    """Set torch's float32 matmul precision for a run: TF32 under tf32, full float32 otherwise."""
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
