"""Layer 4, analytics: reading predictions out of answers, comparing them, drift
(PSI) and sampling. Fed by the hot path through taps; never sends a request."""
