"""Configuration: compose, schema (types, ranges), validate (targets, checks, engine), build, chat templates."""
