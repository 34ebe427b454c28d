"""Tracking: loggers, W&B artifacts, model cards, the console report."""
