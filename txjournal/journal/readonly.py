"""
Read-only views of the SQL journals and SQL snapshot stores, for the
operator tools (``python -m txjournal verify | inspect | check | replay``
on a ``sqlite:///...`` or ``postgresql://...`` URL).

What they never do, unlike the classes they extend:

* create a table (the writers issue ``CREATE TABLE IF NOT EXISTS`` on
  connecting): missing tables raise :class:`NoJournal` /
  :class:`NoSnapshotStore`, naming the database;
* insert the ``journal_id`` or bump the writer epoch:
  :meth:`PostgresJournal.open <txjournal.journal.postgres.PostgresJournal.open>`
  takes the journal over, which **fences the running writer**; a tool
  looking at a live journal must never do that;
* append, prune, save or delete: those raise :class:`ReadOnlySource`.

SQLite databases are opened with ``mode=ro``; PostgreSQL sessions run with
``default_transaction_read_only``, so even a bug here cannot write. (SQLite
may still create the database's ``-wal`` and ``-shm`` files next to it:
reading a WAL-mode database needs its shared-memory index. No table or row
changes.)

:meth:`ReadOnlySQLJournal.consistent` runs a tool inside one read-only
transaction (``REPEATABLE READ`` in PostgreSQL), so a tool sees one moment
of a journal that a writer keeps appending to and pruning: pruning during
a long ``verify`` cannot show up as a gap.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from txjournal import record as rec
from txjournal.errors import SnapshotError, TxJournalError
from txjournal.journal.sql import REPLAY_PAGE, Row, SQLJournal
from txjournal.journal.sqlite import BUSY_TIMEOUT_MS
from txjournal.snapshot.sqlite import SQLSnapshotStore, check_prefix

if TYPE_CHECKING:
    import psycopg

#: Seconds to wait for a PostgreSQL server before giving up.
CONNECT_TIMEOUT = 10

#: ``(seq, time_ns, kind, name, version, user, record)``: a row as :meth:`ReadOnlySQLJournal.rows` gives it.
RawRow = tuple[int, int, int, str, int, str | None, bytes]


class SourceError(TxJournalError):
    """The database cannot be read (unreachable, not a database, no permission)."""


class NoJournal(SourceError):
    """The database holds no journal: the file or the tables do not exist."""


class NoSnapshotStore(SourceError):
    """The database holds no snapshot table."""


class ReadOnlySource(TxJournalError):
    """A read-only view was asked to change something."""


def _missing(what: str) -> type[SourceError]:
    return NoJournal if what == "journal" else NoSnapshotStore


def sqlite_readonly(path: str, tables: Sequence[str], what: str) -> sqlite3.Connection:
    """
    A ``mode=ro`` connection to the existing SQLite file ``path``, which
    must hold ``tables`` (``what``, "journal" or "snapshot store", names
    them in messages). Usable from any thread, one at a time.
    """
    if not os.path.isfile(path):
        raise _missing(what)(f"no SQLite database at {path} (the tools never create one)")
    try:
        conn = sqlite3.connect(
            f"file:{quote(path)}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as e:
        raise SourceError(f"cannot open the SQLite database {path}: {e}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        marks = ", ".join("?" for _ in tables)
        found = {
            r[0] for r in conn.execute(
                f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({marks})",
                tuple(tables),
            )
        }
    except sqlite3.Error as e:
        conn.close()
        raise SourceError(f"cannot read the SQLite database {path}: {e}") from None
    missing = [t for t in tables if t not in found]
    if missing:
        conn.close()
        raise _missing(what)(
            f"no {what} in the SQLite database {path}: table(s) {', '.join(missing)} do not exist"
        )
    return conn


def postgres_readonly(
    dsn: str, location: str, tables: Sequence[str], what: str
) -> psycopg.Connection[Any]:
    """
    An autocommit connection whose transactions are all read-only, to a
    database holding ``tables``; messages name ``location`` (no password).
    """
    import psycopg

    from txjournal.journal.postgres import read_only_session

    try:
        conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
            application_name="txjournal tools (read-only)",
        )
    except psycopg.Error as e:
        raise SourceError(f"cannot connect to {location}: {str(e).strip()}") from None
    try:
        missing = read_only_session(conn, tables)
    except psycopg.Error as e:
        conn.close()
        raise SourceError(f"cannot read {location}: {str(e).strip()}") from None
    if missing:
        conn.close()
        raise _missing(what)(
            f"no {what} in {location}: table(s) {', '.join(missing)} do not exist "
            f"(wrong database, or wrong --table-prefix?)"
        )
    return conn


def _redact(dsn: str) -> str:
    from txjournal.journal.postgres import redact

    return redact(dsn)


# -- journals -------------------------------------------------------------------------


class ReadOnlySQLJournal(SQLJournal):
    """
    What both read-only journals share: :meth:`open` reads the
    ``journal_id`` (and writes nothing), plus the table's bounds, raw rows
    for ``verify``, and one consistent read transaction. :meth:`replay` is
    :class:`SQLJournal`'s, with its checks (a gap or a row that does not
    verify raises :class:`~txjournal.errors.JournalCorrupt`).
    """

    #: The ``journal_id`` found by :meth:`open`; ``None`` for an empty journal without one.
    journal_id_found: int | None = None
    _depth = 0

    def open(self) -> None:
        self._connect()
        self._failed = None
        p = self.param
        rows = self._execute(f"SELECT value FROM {self.meta_table} WHERE key = {p}", ("journal_id",))
        if rows:
            self.journal_id = int(rows[0][0])
            self.journal_id_found = self.journal_id
            self.salt = self.journal_id.to_bytes(8, "little")
        elif self.last_seq() is not None:
            raise NoJournal(
                f"{self.where} holds records but {self.meta_table} holds no journal_id: "
                f"no record can be checked without it"
            )

    def first_seq(self) -> int | None:
        """The smallest sequence number held (``None``: no rows)."""
        ((first,),) = self._execute(f"SELECT min(seq) FROM {self.records_table}")
        return None if first is None else int(first)

    def last_seq(self) -> int | None:
        """The largest sequence number held (``None``: no rows)."""
        ((last,),) = self._execute(f"SELECT max(seq) FROM {self.records_table}")
        return None if last is None else int(last)

    def rows(self, after: int, limit: int = REPLAY_PAGE) -> list[RawRow]:
        """Up to ``limit`` rows with ``seq > after``, in order: their columns and stored record."""
        p = self.param
        out = self._execute(
            f'SELECT seq, time_ns, kind, name, version, "user", record FROM {self.records_table} '
            f"WHERE seq > {p} ORDER BY seq LIMIT {int(limit)}",
            (after,),
        )
        return [(int(s), int(t), int(k), n, int(v), u, bytes(b)) for s, t, k, n, v, u, b in out]

    def decode(self, seq: int, blob: bytes) -> rec.Record:
        """Row ``seq``'s stored record, checked; :class:`JournalCorrupt` if it does not verify."""
        return self._decode(seq, blob, self.salt)

    @contextlib.contextmanager
    def consistent(self) -> Iterator[None]:
        """
        Run the block in one read-only transaction, so that every query
        sees the same moment of a journal a writer may be appending to and
        pruning. Nested blocks share the outermost transaction.
        """
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._execute(self._begin_sql)
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            with contextlib.suppress(Exception):
                self._execute("ROLLBACK")

    _begin_sql = "BEGIN"

    # -- refused ----------------------------------------------------------------------

    def _insert_batch(self, rows: list[Row], first_seq: int) -> None:
        raise ReadOnlySource(f"{self.where} is opened read-only: append refused")

    def append(self, data: bytes, first_seq: int, last_seq: int) -> None:
        raise ReadOnlySource(f"{self.where} is opened read-only: append refused")

    def prune(self, upto_seq: int) -> list[str]:
        raise ReadOnlySource(f"{self.where} is opened read-only: prune refused")


class ReadOnlySQLiteJournal(ReadOnlySQLJournal):
    """
    The journal of :class:`~txjournal.journal.sqlite.SQLiteJournal` (tables
    ``records`` and ``meta``), opened with ``mode=ro``; the file and its
    tables must exist.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        super().__init__(self.path, sync=True)
        self.where = f"{self.path} table {self.records_table}"
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite_readonly(self.path, (self.records_table, self.meta_table), "journal")
        return self._conn

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise SourceError(f"cannot read the SQLite journal {self.path}: {e}") from None

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class ReadOnlyPostgresJournal(ReadOnlySQLJournal):
    """
    The journal of :class:`~txjournal.journal.postgres.PostgresJournal`
    (``<prefix>_records``, ``<prefix>_meta``) read in read-only sessions:
    unlike its :meth:`open`, this one never takes the journal over, so the
    writer epoch stays as it is and the running writer is not fenced.

    :param location: how messages name the server (default: the
        connection string without its password).
    """

    param = "%s"
    _begin_sql = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    def __init__(self, dsn: str, table_prefix: str = "txjournal", location: str | None = None) -> None:
        check_prefix(table_prefix)
        super().__init__(location or _redact(dsn), sync=True)
        self._dsn = dsn
        self.table_prefix = table_prefix
        self.records_table = f"{table_prefix}_records"
        self.meta_table = f"{table_prefix}_meta"
        self.where = f"{self.location} table {self.records_table}"
        self._conn: psycopg.Connection[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            self._conn = postgres_readonly(
                self._dsn, self.location, (self.records_table, self.meta_table), "journal"
            )
        return self._conn

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        conn = self._connect()
        try:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.Error as e:
            raise SourceError(f"cannot read {self.where}: {str(e).strip()}") from None

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def writer_epoch(self) -> int | None:
        """The writer epoch in the meta table (``None`` before any writer took over)."""
        rows = self._execute(f"SELECT value FROM {self.meta_table} WHERE key = 'writer_epoch'")
        return int(rows[0][0]) if rows else None


# -- snapshot stores --------------------------------------------------------------------


class ReadOnlySQLSnapshotStore(SQLSnapshotStore):
    """
    What the read-only snapshot stores share: :meth:`open` (connect now,
    so a missing table is reported before any work), both digests of a
    snapshot at once, and no writes.
    """

    def _connect(self) -> Any:
        raise NotImplementedError

    def open(self) -> None:
        with self._lock:
            self._connect()

    def digests(self, seq: int) -> tuple[bytes, bytes]:
        """``(model digest, payload SHA-256)`` as stored, without reading the payload."""
        model, payload = self._fetch("model_digest, payload_sha256", seq)
        if model is None or len(model) != 32 or payload is None:
            raise SnapshotError(f"snapshot {seq} in {self.where} has a damaged digest")
        return bytes(model), bytes(payload)

    def save(self, seq: int, payload: bytes, model_digest: bytes | None = None) -> str:
        raise ReadOnlySource(f"{self.where} is opened read-only: save refused")

    def prune(self, keep: int) -> builtins.list[int]:
        raise ReadOnlySource(f"{self.where} is opened read-only: prune refused")


class ReadOnlySQLiteSnapshotStore(ReadOnlySQLSnapshotStore):
    """The snapshots of :class:`~txjournal.snapshot.sqlite.SQLiteSnapshotStore`, opened with ``mode=ro``."""

    def __init__(self, path: str, table_prefix: str = "txjournal") -> None:
        super().__init__(table_prefix)
        self.path = os.path.abspath(path)
        self.location = self.path
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite_readonly(self.path, (self.table,), "snapshot store")
        return self._conn

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise SourceError(f"cannot read {self.where}: {e}") from None

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()


class ReadOnlyPostgresSnapshotStore(ReadOnlySQLSnapshotStore):
    """
    The snapshots of :class:`~txjournal.snapshot.postgres.PostgresSnapshotStore`,
    read in read-only sessions.

    :param location: how messages name the server (default: the
        connection string without its password).
    """

    param = "%s"

    def __init__(self, dsn: str, table_prefix: str = "txjournal", location: str | None = None) -> None:
        super().__init__(table_prefix)
        self._dsn = dsn
        self.location = location or _redact(dsn)
        self._conn: psycopg.Connection[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            self._conn = postgres_readonly(self._dsn, self.location, (self.table,), "snapshot store")
        return self._conn

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        import psycopg

        conn = self._connect()
        try:
            # Binary results: a payload arrives as its bytes, not twice as much hex.
            cur = conn.execute(sql, params, binary=True)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.Error as e:
            raise SourceError(f"cannot read {self.where}: {str(e).strip()}") from None

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
