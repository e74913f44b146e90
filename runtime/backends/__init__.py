"""Runtime backends, chosen by name and imported lazily."""
