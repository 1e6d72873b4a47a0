"""Alembic environment: the URL comes from the caller (db.migrate.upgrade) or from REFINERY_ settings."""
from alembic import context

from core.settings import get_settings
from db.models import Base
from db.session import get_engine

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database_url


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = get_engine(url)
    with engine.connect() as connection:
        # render_as_batch lets ALTERs work on SQLite too (it rebuilds the table).
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
