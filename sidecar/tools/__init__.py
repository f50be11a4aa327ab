"""Offline commands (reports, label joins, starting configs, the container
healthcheck). Never imported by the server."""
