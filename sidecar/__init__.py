"""sidecar: a reverse proxy that gives an ML model server what production needs."""

__version__ = "0.1.0"
