"""Checkpoints and run directories: atomic writes, resume, signals, locks, run-directory safety."""
