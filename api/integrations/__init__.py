"""Integrations with the tools users already run: a finished job exported to an MLflow tracking server."""
