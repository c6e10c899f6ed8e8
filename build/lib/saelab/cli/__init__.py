"""The command lines: saelab-train, saelab-eval, saelab-cache and their up-front checks."""
