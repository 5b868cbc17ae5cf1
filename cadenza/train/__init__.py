"""Training: the shared loop (a recipe that reads top to bottom) and its checkpoints."""
