"""Layer 1, config: the schema of a config file (units, secrets, loading) and the
compile step that turns it into an immutable plan (every file read, every schema,
rule and baseline compiled once). Imports nothing else of the sidecar."""
