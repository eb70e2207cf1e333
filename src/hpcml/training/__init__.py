"""The training loop, optimizers, precision/compile choice, checkpoints and run reports."""
