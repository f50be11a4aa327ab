"""The built-in demo: an iris model server, a candidate model and the sidecar."""
