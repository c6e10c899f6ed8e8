"""Evaluation metrics on held-out activations."""
