"""The config language: the typed schema (validation, defaults, docs) and loading YAML/dicts into it."""
