"""
The PostgreSQL server the SQL journal tests run against.

The tests use the real server on this machine (trust authentication) and
never skip when it is down: a silently skipped backend is an untested one.
Each test gets its own table prefix, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from examples.bank import bank
from txjournal import JournalService
from txjournal.journal.memory import MemorySnapshotStore
from txjournal.journal.postgres import PostgresJournal
from txjournal.replica import ReplicaService

#: Override with ``TXJOURNAL_TEST_PG`` to test against another server.
PG_DSN = os.environ.get(
    "TXJOURNAL_TEST_PG", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)

START_HINT = (
    "PostgreSQL is not reachable at {dsn} ({error}). The SQL journal tests need it: "
    "start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
    "(or point TXJOURNAL_TEST_PG at another server)"
)


def require_pg() -> None:
    """Fail (never skip) the calling test if the server is down."""
    try:
        with psycopg.connect(PG_DSN, connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as e:
        pytest.fail(START_HINT.format(dsn=PG_DSN, error=str(e).strip()), pytrace=False)


def unique_prefix() -> str:
    return "t_" + secrets.token_hex(6)


def drop_tables(prefix: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {prefix}_records, {prefix}_meta")


def sql(query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement on a connection of its own (as another client would)."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description is not None else []


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new, empty database for the duration; yields its ``postgresql://`` URL, dropped afterwards."""
    require_pg()
    database = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    params = psycopg.conninfo.conninfo_to_dict(PG_DSN)
    params["dbname"] = database
    try:
        yield "postgresql://{user}@{host}:{port}/{dbname}".format(**params)
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


#: Replica tests put a password in the DSN to check it is never shown (trust auth ignores it).
PASSWORD_DSN = PG_DSN + " password=s3cret-not-used"

#: Seconds between a test replica's polls.
POLL = 0.02


class Cluster:
    """Writers and replicas of the bank on one journal (tables ``prefix``), for the ``cluster`` fixture."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.services: list[Any] = []
        self.snapshots = MemorySnapshotStore()

    def writer(self, **journal_options: Any) -> JournalService[Any]:
        svc: JournalService[Any] = JournalService(
            bank, journal=PostgresJournal(PG_DSN, table_prefix=self.prefix, **journal_options),
            snapshots=self.snapshots, snapshot_on_stop=False,
        )
        svc.startService()
        self.services.append(svc)
        return svc

    def replica(self, **kw: Any) -> ReplicaService[Any]:
        kw.setdefault("poll_interval", POLL)
        rep: ReplicaService[Any] = ReplicaService(
            bank, PASSWORD_DSN, table_prefix=self.prefix, **kw
        )
        rep.startService()
        self.services.append(rep)
        return rep
