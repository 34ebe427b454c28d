"""Training: the LightningModule, its callbacks, the process allocator settings."""
