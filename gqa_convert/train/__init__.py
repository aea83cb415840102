"""Uptraining: settings and budget, data preparation, the Accelerate worker loop, checkpoints, export
and launch."""
