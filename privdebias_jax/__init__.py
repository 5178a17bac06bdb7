"""privdebias_jax."""
