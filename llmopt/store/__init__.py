"""Model management: the models.toml registry, fetching, and the local store."""
