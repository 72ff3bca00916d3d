"""Trainer plugins on the one training loop."""
