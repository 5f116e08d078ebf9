"""
A journal in one SQLite database file (stdlib :mod:`sqlite3`).

For deployments that want their history in a single file they can query
with SQL (``SELECT json_extract(fields, '$.account') FROM records``) rather
than in segment files. The table layout and the checks replay makes are
described in :mod:`txjournal.journal.sql`.

Durability: the database runs in WAL mode with ``synchronous=FULL``, so a
commit returns only once the WAL is fsynced, which is the promise the
engine needs before it acknowledges a batch. ``sync=False`` uses
``synchronous=NORMAL``: a power failure may then lose acknowledged
commands (the database itself stays consistent). For tests and benchmarks.

Threads: :mod:`sqlite3` binds a connection to the thread that made it
unless ``check_same_thread=False``. Start-up replays on the reactor thread
and the writer thread appends afterwards, never both at once, so the
connection is shared with that check off; the journal is still not safe
for concurrent use.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

from zope.interface import implementer

from txjournal.fs import DIR_MODE, FILE_MODE
from txjournal.interfaces import IJournal
from txjournal.journal.sql import Row, SequenceTaken, SQLJournal

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
        seq INTEGER PRIMARY KEY,
        time_ns INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        user TEXT,
        fields TEXT,
        record BLOB NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

#: How long a statement waits for another connection's lock before failing.
BUSY_TIMEOUT_MS = 10_000


def open_private(path: str, sync: bool, schema: Sequence[str]) -> sqlite3.Connection:
    """
    Connect to the SQLite file ``path`` in WAL mode, creating it (mode 0600,
    directory 0700) and the tables in ``schema`` if missing.

    The connection may be used from any thread (``check_same_thread`` off):
    callers guarantee one thread at a time.
    """
    os.makedirs(os.path.dirname(path), mode=DIR_MODE, exist_ok=True)
    # Created here rather than by SQLite so it is private from the first
    # byte, whatever the umask; the WAL and shared-memory files copy it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    os.close(fd)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode.lower() != "wal":
            raise OSError(f"SQLite refused WAL mode for {path} (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if sync else 'NORMAL'}")
        for statement in schema:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


@implementer(IJournal)
class SQLiteJournal(SQLJournal):
    """
    :param path: the database file; created (mode 0600, its directory 0700)
        if missing. SQLite gives its ``-wal`` and ``-shm`` files the
        database file's mode.
    :param sync: ``False`` uses ``synchronous=NORMAL``; see the module
        docstring for what that risks.
    """

    def __init__(self, path: str, sync: bool = True) -> None:
        self.path = os.path.abspath(path)
        super().__init__(self.path, sync)
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_private(self.path, self.sync, _SCHEMA)
        return self._conn

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._connect()
        return conn.execute(sql, params).fetchall()

    def _insert_batch(self, rows: list[Row], first_seq: int) -> None:
        conn = self._connect()
        # IMMEDIATE takes the write lock now, so the max(seq) check and the
        # inserts see no other writer in between.
        conn.execute("BEGIN IMMEDIATE")
        try:
            ((newest,),) = conn.execute("SELECT max(seq) FROM records").fetchall()
            if (newest or 0) != first_seq - 1:
                raise SequenceTaken(
                    f"{self.path} ends at sequence number {newest or 0}, so this writer "
                    f"cannot append {first_seq}: another writer is using the journal"
                )
            try:
                conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError as e:
                raise SequenceTaken(
                    f"sequence numbers {first_seq}..{rows[-1][0]} collide with rows in "
                    f"{self.path}: another writer is using the journal ({e})"
                ) from e
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # A failed rollback must not hide why the batch failed;
                # SQLite rolls back on its own when the connection closes.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
