"""saelab: a Hydra + Lightning harness for training and comparing sparse autoencoders."""

__version__ = "0.1.0"
