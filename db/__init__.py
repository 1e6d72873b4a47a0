"""The ledger: SQLAlchemy models, sessions, repositories (all queries), job lifecycle, migrations, sweeps."""
