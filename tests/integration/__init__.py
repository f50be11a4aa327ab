"""Integration tests: a real sidecar in the test's process, fake model servers and
clients on 127.0.0.1 sockets."""
