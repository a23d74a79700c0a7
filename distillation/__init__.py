"""Distillation: teacher -> student losses (KL, hidden-state MSE, WGAN-GP Wasserstein) and the
Impossible Distillation pipeline's data stages (generate, filter, build)."""
