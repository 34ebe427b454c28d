"""Pipelines: stage strategies against forgetting and the forgetting matrix."""
