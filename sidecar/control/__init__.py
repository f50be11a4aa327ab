"""Layer 7, control: a config's runtime, reloads, readiness, the listeners, worker
processes and the operator's endpoints."""
