"""Running models: distributed set-up, generation, training."""
