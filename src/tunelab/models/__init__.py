"""Models: loading a causal LM and tokenizer, applying a fine-tuning method, sharding."""
