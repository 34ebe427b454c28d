"""tunelab: declarative fine-tuning of language models with Hydra, Lightning, PEFT and W&B."""

__version__ = "0.1.0"
