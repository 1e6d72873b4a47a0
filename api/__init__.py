"""The REST gateway (FastAPI): validates specs, writes ledger rows, publishes job ids, streams artifacts. No torch."""
