"""A run: its jobs, their grouping, the activation stream, the training loop, evaluation and results."""
