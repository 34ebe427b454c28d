"""Configuration: schemas, composition, semantic checks, target signatures, redaction."""
