"""Liveness, readiness and Prometheus metrics; the only routes without an API key."""
