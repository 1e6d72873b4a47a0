"""Engines and sessions, one engine per database URL per process."""
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


@lru_cache
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Several processes (api, worker, CLI) share one file: WAL lets readers run beside the writer, and
        # busy_timeout makes a writer wait for the lock instead of failing.
        # Every transaction starts with BEGIN IMMEDIATE (SQLAlchemy's pysqlite recipe): a read that later writes
        # would otherwise fail with "database is locked" instead of waiting when another process wrote meanwhile.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=10,
                               max_overflow=20)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # Read-only sessions (GET requests) take no write lock, so status polling does not queue behind writers.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("readonly") else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    # 30 connections: above the API's admission limit (REFINERY_API_CONCURRENCY, 24) plus the sweeper's.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def transaction(url: str, readonly: bool = False) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error. `readonly` lets SQLite skip the write lock."""
    session = get_sessionmaker(url)(bind=get_engine(url).execution_options(readonly=True)) if readonly \
        else get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
