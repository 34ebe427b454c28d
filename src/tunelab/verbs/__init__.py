"""Verbs: one file per `tunelab <verb>`, each a plain function `(cfg, run) -> result`."""
