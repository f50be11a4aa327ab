"""Unit tests: one module at a time, no sockets, no processes."""
