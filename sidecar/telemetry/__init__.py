"""Layer 2, telemetry: Prometheus metrics, structured logs and the log writer that
keeps their I/O off the event loop. Imports only config."""
