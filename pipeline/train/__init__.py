"""Training: the loop, fold state and checkpoints, distributed, budget, cross-validation, tracking, curves."""
