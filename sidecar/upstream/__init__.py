"""Layer 5, upstream: one ``send()`` per model server (its pool, its headers, its
deadline, its errors), retries, the breaker, fallbacks, shadow copies, and state
shared across replicas."""
