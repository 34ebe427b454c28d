"""Evaluation: the one scoring path, metrics, prompting strategies, retrieval."""
