"""SAE variants. Each file holds one variant: an `SAE` subclass and its `Config` dataclass."""

from saelab.saes.base import SAE, SAEConfig, TrainStep, build_sae

__all__ = ["SAE", "SAEConfig", "TrainStep", "build_sae"]
