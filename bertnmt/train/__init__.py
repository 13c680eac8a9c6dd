"""Layer 4: the training engine: freeze policy, optimizer, checkpoints, trainer, run folders."""
