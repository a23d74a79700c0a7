"""The one training machinery shared by every script: CLI flags, model building, device and precision,
length-bucketed batching, the training loop with checkpoints and resume, and the run's metrics log."""
