"""
The PostgreSQL server the SQL journal tests run against.

The tests use the real server on this machine (trust authentication) and
never skip when it is down: a silently skipped backend is an untested one.
Each test gets its own table prefix, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets

import psycopg
import pytest

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
