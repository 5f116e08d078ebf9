"""
Snapshots in an SQLite database (stdlib :mod:`sqlite3`), for deployments
whose journal is in SQL too, or that want one file to back up.

One table, ``<prefix>_snapshots`` (``txjournal_snapshots`` by default)::

    seq BIGINT PRIMARY KEY      the sequence number the snapshot covers
    payload BLOB                the serialized model
    payload_sha256 BLOB         SHA-256 of payload, checked on every load
    model_digest BLOB           the schema's model digest (32 bytes)
    created_ns BIGINT           when it was saved (ns since the epoch)

``save`` inserts (or replaces the row of the same ``seq``) in one
transaction, so a crash leaves the old set of snapshots or the new one.
``load`` checks the payload against its SHA-256 and raises
:class:`~txjournal.errors.SnapshotError` naming the database and ``seq``
when the row is missing or damaged; the service then falls back to an older
snapshot.

The table does not collide with the SQLite journal's, so both may share a
file; a separate file is still better: SQLite has one writer at a time,
and a large snapshot's transaction would make journal commits wait (up to
:data:`BUSY_TIMEOUT_MS`).

Threads: the store opens its own connection (never the journal's). The
service uses it at start-up from the reactor thread, then from its
snapshot thread, never both at once; the connection is therefore shared
with ``check_same_thread=False``, and a lock serializes every call anyway,
so concurrent use is merely slow, not unsafe.

Durability: WAL mode with ``synchronous=FULL``: ``save`` returns once the
WAL is fsynced.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import re
import sqlite3
import threading
import time
from typing import Any

from zope.interface import implementer

from txjournal.errors import SnapshotError
from txjournal.interfaces import ISnapshotStore
from txjournal.journal.sqlite import BUSY_TIMEOUT_MS, open_private  # noqa: F401 (documented here too)

#: How long a statement waits for another connection's lock before failing.


_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def check_prefix(table_prefix: str) -> str:
    if not _PREFIX_RE.match(table_prefix):
        raise ValueError(
            f"table prefix {table_prefix!r} must be lower case letters, digits and "
            f"underscores, starting with a letter or underscore"
        )
    return table_prefix


class SQLSnapshotStore:
    """
    What the SQL snapshot stores share: the queries and the checks. A
    subclass supplies ``location``, ``param`` and the three database calls.
    """

    location: str
    table: str
    #: The driver's placeholder.
    param = "?"

    def __init__(self, table_prefix: str) -> None:
        self.table = f"{check_prefix(table_prefix)}_snapshots"
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"{self.location} table {self.table}"

    # -- supplied by the backend ----------------------------------------------------

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _replace(self, row: tuple[int, bytes, bytes, bytes, int]) -> None:
        """Insert ``row``, replacing any of the same seq, in one transaction."""
        raise NotImplementedError

    def _delete_upto(self, seq: int) -> None:
        """Delete every row with ``seq`` or less, in one transaction."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- ISnapshotStore -------------------------------------------------------------

    def list(self) -> builtins.list[int]:
        with self._lock:
            rows = self._query(f"SELECT seq FROM {self.table} ORDER BY seq DESC")
        return [int(r[0]) for r in rows]

    def _fetch(self, column: str, seq: int) -> tuple[Any, ...]:
        p = self.param
        try:
            with self._lock:
                rows = self._query(f"SELECT {column} FROM {self.table} WHERE seq = {p}", (seq,))
        except Exception as e:
            raise SnapshotError(f"snapshot {seq} in {self.where} cannot be read: {e}") from None
        if not rows:
            raise SnapshotError(f"snapshot {seq} in {self.where} does not exist")
        return rows[0]

    def load(self, seq: int) -> bytes:
        payload, digest = self._fetch("payload, payload_sha256", seq)
        if payload is None:
            raise SnapshotError(f"snapshot {seq} in {self.where} has no payload")
        payload = bytes(payload)
        if digest is None or hashlib.sha256(payload).digest() != bytes(digest):
            raise SnapshotError(f"snapshot {seq} in {self.where} fails its SHA-256 digest check")
        return payload

    def model_digest(self, seq: int) -> bytes:
        (digest,) = self._fetch("model_digest", seq)
        if digest is None or len(digest) != 32:
            raise SnapshotError(f"snapshot {seq} in {self.where} has a damaged model digest")
        return bytes(digest)

    def _check_payload(self, payload: bytes) -> None:
        """Refuse what the backend cannot store (before any work is done)."""

    def save(self, seq: int, payload: bytes, model_digest: bytes | None = None) -> str:
        payload = bytes(payload)
        payload_digest = hashlib.sha256(payload).digest()
        if model_digest is None:
            model_digest = payload_digest
        if len(model_digest) != 32:
            raise ValueError("a model digest is 32 bytes (a SHA-256)")
        self._check_payload(payload)
        with self._lock:
            self._replace((seq, payload, payload_digest, bytes(model_digest), time.time_ns()))
        return f"{self.where} seq {seq}"

    def prune(self, keep: int) -> builtins.list[int]:
        if keep < 1:
            raise ValueError("keep at least one snapshot")
        removed = self.list()[keep:]
        if removed:
            with self._lock:
                self._delete_upto(removed[0])
        return removed


@implementer(ISnapshotStore)
class SQLiteSnapshotStore(SQLSnapshotStore):
    """
    :param path: the database file; created (mode 0600, its directory 0700)
        if missing. SQLite gives its ``-wal`` and ``-shm`` files the
        database file's mode.
    :param table_prefix: the table is ``<prefix>_snapshots``.
    """

    def __init__(self, path: str, table_prefix: str = "txjournal") -> None:
        super().__init__(table_prefix)
        self.path = os.path.abspath(path)
        self.location = self.path
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            table = f"""CREATE TABLE IF NOT EXISTS {self.table} (
                seq BIGINT PRIMARY KEY,
                payload BLOB NOT NULL,
                payload_sha256 BLOB NOT NULL,
                model_digest BLOB NOT NULL,
                created_ns BIGINT NOT NULL
            )"""
            self._conn = open_private(self.path, True, [table])
        return self._conn

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._connect().execute(sql, params).fetchall()

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _replace(self, row: tuple[int, bytes, bytes, bytes, int]) -> None:
        self._write(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?, ?, ?)", row)

    def _delete_upto(self, seq: int) -> None:
        self._write(f"DELETE FROM {self.table} WHERE seq <= ?", (seq,))

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
