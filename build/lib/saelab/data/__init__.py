"""Text sources, model loading and the activation stream that feeds the SAE."""
