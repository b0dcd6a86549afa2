"""fedprefix.coordinator: the Flower ServerApp, strategies, CLI, dashboard and serving."""
