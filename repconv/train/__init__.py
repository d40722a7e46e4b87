"""Recovering and training: calibration, the training loop (finetune / train, DDP, resume) and their data."""
