"""
Snapshots in a PostgreSQL table, through psycopg 3 (``pip install
'txjournal[postgres]'``), so a replacement machine can start from the
newest snapshot without the old machine's disk.

The table is ``<prefix>_snapshots`` with the layout described in
:mod:`txjournal.snapshot.sqlite` (``bytea`` for the binary columns); it
sits beside a PostgreSQL journal's ``<prefix>_records`` and ``<prefix>_meta``
without colliding. ``save`` is one transaction (insert, or replace the same
``seq``) committed with ``synchronous_commit`` on; ``load`` checks the
payload's SHA-256 and raises :class:`~txjournal.errors.SnapshotError`
naming the server (password redacted), table and ``seq``.

Size limit: a ``bytea`` value holds at most 1 GiB, so a serialized model of
:data:`MAX_PAYLOAD` bytes or more cannot be saved here (``save`` refuses it
with a ``SnapshotError`` before sending anything; older snapshots stay
usable). The payload travels in binary, not hex, both ways, but the server
and the client each hold a whole payload in memory while it moves: use the
file store for models near that size.

Threads: the store opens its own connection (never the journal's), lazily.
The service uses it at start-up from the reactor thread, then from its
snapshot thread, never both at once; a lock serializes every call anyway.
A connection found closed or broken is replaced on the next call; nothing
is retried within a call (a failed save is logged by the service and the
next snapshot tries again).
"""

from __future__ import annotations

from typing import Any

import psycopg
from zope.interface import implementer

from txjournal.errors import SnapshotError
from txjournal.interfaces import ISnapshotStore
from txjournal.journal.postgres import pg_connect, redact
from txjournal.snapshot.sqlite import SQLSnapshotStore

#: The largest payload a ``bytea`` column takes is 1 GiB less a little
#: overhead; this store refuses payloads of this size or more.
MAX_PAYLOAD = (1 << 30) - (1 << 20)


@implementer(ISnapshotStore)
class PostgresSnapshotStore(SQLSnapshotStore):
    """
    :param dsn: a libpq connection string or ``postgresql://`` URL.
    :param table_prefix: the table is ``<prefix>_snapshots``. Lower case
        letters, digits and underscores.
    """

    param = "%s"

    def __init__(self, dsn: str, table_prefix: str = "txjournal") -> None:
        super().__init__(table_prefix)
        self._dsn = dsn
        self.location = redact(dsn)
        self._conn: psycopg.Connection[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._conn = None
        if conn is not None:
            conn.close()
        conn = pg_connect(self._dsn)  # timeouts and keepalives: a dead server cannot hang it
        try:
            row = conn.execute("SHOW synchronous_commit").fetchone()
            if row and row[0] == "off":
                # The server's default would acknowledge before the WAL is flushed.
                conn.execute("SET synchronous_commit = on")
            with conn.transaction():
                conn.execute(
                    f"""CREATE TABLE IF NOT EXISTS {self.table} (
                        seq bigint PRIMARY KEY,
                        payload bytea NOT NULL,
                        payload_sha256 bytea NOT NULL,
                        model_digest bytea NOT NULL,
                        created_ns bigint NOT NULL
                    )"""
                )
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # Binary results: a payload arrives as its bytes, not twice as much hex.
        cur = self._connect().execute(sql, params, binary=True)
        return cur.fetchall() if cur.description is not None else []

    def _check_payload(self, payload: bytes) -> None:
        if len(payload) >= MAX_PAYLOAD:
            raise SnapshotError(
                f"a snapshot of {len(payload)} bytes is too large for {self.where}: "
                f"PostgreSQL bytea holds less than 1 GiB; use the file snapshot store"
            )

    def _replace(self, row: tuple[int, bytes, bytes, bytes, int]) -> None:
        conn = self._connect()
        with conn.transaction():
            conn.execute(
                f"INSERT INTO {self.table} VALUES (%b, %b, %b, %b, %b) ON CONFLICT (seq) DO UPDATE "
                f"SET payload = EXCLUDED.payload, payload_sha256 = EXCLUDED.payload_sha256, "
                f"model_digest = EXCLUDED.model_digest, created_ns = EXCLUDED.created_ns",
                row,
            )

    def _delete_upto(self, seq: int) -> None:
        conn = self._connect()
        with conn.transaction():
            conn.execute(f"DELETE FROM {self.table} WHERE seq <= %s", (seq,))

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
