"""System tests: the sidecar as users run it, in its own processes (the CLI, workers,
the demo, the documented commands, fresh installs)."""
