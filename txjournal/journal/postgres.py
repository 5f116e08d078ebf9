"""
A journal in PostgreSQL tables, through psycopg 3 (``pip install
'txjournal[postgres]'``).

Why PostgreSQL: the journal is the unit of replication, and PostgreSQL
already does the distributed part (streaming replicas, failover) that
txjournal will not reinvent. Its primary key on ``seq`` fences writers: a
second writer's insert of a sequence number already taken fails, its batch
rolls back and is never acknowledged. The table layout and the checks
replay makes are described in :mod:`txjournal.journal.sql`; the tables
are ``<prefix>_records`` (``fields`` as ``jsonb``, ``record`` as ``bytea``;
``user`` is a reserved word in PostgreSQL, so query it as ``"user"``) and
``<prefix>_meta``.

Why a plain synchronous connection and not ``twisted.enterprise.adbapi``:
the engine already runs ``append`` on its own writer thread, one batch at a
time, which is exactly the job a connection pool would do. One connection
is used by one thread at a time: start-up replay on the reactor thread
before the writer thread starts, then appends and prunes on the writer
thread.

Durability: each batch is one transaction committed with
``synchronous_commit`` on (or the server's stronger setting, such as
``remote_apply``, which is kept). ``sync=False`` turns it off for the
session: a server crash may then lose acknowledged commands. For tests and
benchmarks only.

Failure: a lost connection or any other error during an append propagates
(the engine then stops accepting commands) and the connection is closed;
nothing is retried, because the outcome of a commit whose answer was lost
is unknown. Restarting the service reconnects and replays exactly what the
server kept.

At most one writer (the lease): a writer holds a session-level advisory
lock keyed by the journal's id for as long as its connection lives, and
bumps the writer epoch in ``<prefix>_meta``; every append checks the epoch
in the same statement that inserts. The lock says "a writer is alive" (a
second writer refuses to start, a replica with automatic promotion waits
for it to go); the epoch is the fence (a writer that was taken over fails
its next batch before acknowledging it, even if its session survived).
The lock goes with the session, so a writer killed with SIGKILL, or whose
connection the server terminated, frees it at once: the server closes the
session when the socket closes. A writer cut off by a network partition
keeps it until the server notices (TCP keepalives; set
``tcp_keepalives_idle`` on the server); ``take_over`` does not wait for
that.

Each batch is one statement (one round trip, its own transaction): the
epoch check, the continuity check, the insert of every row and a
``NOTIFY <prefix>_appended`` that wakes replicas.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from zope.interface import implementer

from txjournal.errors import WriterActive
from txjournal.interfaces import IJournal
from txjournal.journal.sql import Fenced, Row, SequenceTaken, SQLJournal

_FENCED_ADVICE = (
    ": the journal has a new writer. Do not restart this one with --take-over, "
    "which would fence the new writer; restart it as a replica (--replica-of) instead"
)

_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def lease_key(journal_id: int) -> int:
    """The advisory lock key of a journal: its 64-bit id as a signed bigint."""
    return journal_id - (1 << 64) if journal_id >= (1 << 63) else journal_id


def lease_holders_sql(key: int) -> tuple[str, tuple[int, int]]:
    """
    A query for the sessions holding the lease ``key``: ``pg_locks`` shows a
    bigint advisory key as its high and low 32 bits (``classid``,
    ``objid``) with ``objsubid`` 1. Reading it takes no lock, so a
    read-only replica can ask whether a writer is alive.
    """
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return (
        "SELECT l.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local'), "
        "a.backend_start FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        # Advisory locks are per database, and a copied database keeps its
        # journal id: another database's writer is not this journal's.
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.pid <> pg_backend_pid()",
        (unsigned >> 32, unsigned & 0xFFFFFFFF),
    )


#: Connection settings a dead server or a silent network cannot hang
#: forever: libpq gives up connecting after ``connect_timeout`` seconds,
#: keepalives find a peer that vanished, and ``tcp_user_timeout`` (ms)
#: fails a send that nothing acknowledges. Settings in the URL win.
CONNECTION_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


def pg_connect(dsn: str, **settings: str) -> psycopg.Connection[Any]:
    """``psycopg.connect`` in autocommit mode, with :data:`CONNECTION_DEFAULTS` where ``dsn`` sets nothing."""
    given = conninfo_to_dict(dsn)
    extra = {k: v for k, v in {**CONNECTION_DEFAULTS, **settings}.items() if k not in given}
    return psycopg.connect(make_conninfo(dsn, **extra), autocommit=True)


def read_only_session(conn: psycopg.Connection[Any], tables: Sequence[str]) -> list[str]:
    """
    Make every later transaction of ``conn`` read-only (so even a bug
    cannot write through it) and return which of ``tables`` do not exist:
    readers (replicas, the tools) never create tables.
    """
    conn.execute("SET default_transaction_read_only = on")
    marks = ", ".join("to_regclass(%s)" for _ in tables)
    row = conn.execute(f"SELECT {marks}", tuple(tables)).fetchone() or (None,) * len(tables)
    return [table for table, found in zip(tables, row) if found is None]


def redact(dsn: str) -> str:
    """``dsn`` without its password, for messages and logs."""
    params = conninfo_to_dict(dsn)
    params.pop("password", None)
    return make_conninfo("", **params) or "postgresql (libpq defaults)"


@implementer(IJournal)
class PostgresJournal(SQLJournal):
    """
    :param dsn: a libpq connection string or ``postgresql://`` URL.
    :param table_prefix: the tables are ``<prefix>_records`` and
        ``<prefix>_meta``, so several journals can share a database. Lower
        case letters, digits and underscores.
    :param sync: ``False`` sets ``synchronous_commit = off``; see the module
        docstring for what that risks.
    :param take_over: if another writer holds the lease, fence it (bump the
        epoch, so its next batch fails), terminate its session and take the
        lease, instead of refusing to open with :class:`WriterActive`.
    :param lease_timeout: seconds to wait for the lease (a writer killed a
        moment ago may still hold it while the server notices).
    """

    param = "%s"

    def __init__(
        self,
        dsn: str,
        table_prefix: str = "txjournal",
        sync: bool = True,
        *,
        take_over: bool = False,
        lease_timeout: float = 10.0,
    ) -> None:
        if not _PREFIX_RE.match(table_prefix):
            raise ValueError(
                f"table prefix {table_prefix!r} must be lower case letters, digits and "
                f"underscores, starting with a letter or underscore"
            )
        super().__init__(redact(dsn), sync)
        self._dsn = dsn
        self.table_prefix = table_prefix
        self.records_table = f"{table_prefix}_records"
        self.meta_table = f"{table_prefix}_meta"
        self.where = f"{self.location} table {self.records_table}"
        self._conn: psycopg.Connection[Any] | None = None
        #: Writer epoch taken by :meth:`open`; appends fail once it is stale.
        self.epoch = 0
        self.take_over = take_over
        self.lease_timeout = lease_timeout
        #: The channel every append notifies (payload: its last sequence number).
        self.channel = f"{table_prefix}_appended"
        self._leased = False
        guard = (
            f"WITH guard AS (SELECT "
            f"(SELECT value::bigint FROM {self.meta_table} WHERE key = 'writer_epoch' FOR SHARE) AS epoch, "
            f"(SELECT coalesce(max(seq), 0) FROM {self.records_table}) AS newest), "
            f"ins AS (INSERT INTO {self.records_table} {{rows}} "
            f"WHERE (SELECT epoch FROM guard) = %s AND (SELECT newest FROM guard) = %s RETURNING 1) "
            f"SELECT (SELECT count(*) FROM ins), epoch, newest, "
            f"CASE WHEN (SELECT count(*) FROM ins) > 0 THEN pg_notify(%s, %s) END FROM guard"
        )
        # Arrays for a batch (one statement whatever its size, so one
        # prepared plan); a single row as plain values, which saves the
        # array handling (about 0.2 ms) when one caller waits for each.
        self._append_sql = guard.format(rows=(
            "SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::integer[], %s::text[], "
            "%s::integer[], %s::text[], %s::jsonb[], %s::bytea[])"
        ))
        self._append_one_sql = guard.format(rows=(
            "SELECT v.* FROM (VALUES (%s::bigint, %s::bigint, %s::integer, %s::text, "
            "%s::integer, %s::text, %s::jsonb, %s::bytea)) v"
        ))

    @property
    def backend_pid(self) -> int | None:
        """The server process serving this journal's connection, if connected."""
        return self._conn.info.backend_pid if self._conn is not None else None

    def open(self) -> None:
        if self._leased and self._conn is not None and not self._conn.closed:
            return  # already the writer (a promoted replica opens before starting)
        super().open()
        key = lease_key(self.journal_id)
        if self.take_over:
            # Fence first: a live writer's next batch fails at the epoch check
            # even if its session cannot be terminated.
            self._take_over()
            self._terminate_holders(key)
        self._acquire_lease(key)
        self._take_over()
        self._leased = True

    def lease_holders(self) -> list[tuple[int, str, str, Any]]:
        """``(pid, application_name, client address, backend start)`` of other sessions holding the lease."""
        sql, params = lease_holders_sql(lease_key(self.journal_id))
        return [tuple(row) for row in self._execute(sql, params)]

    def _terminate_holders(self, key: int) -> None:
        for pid, app, addr, _ in self.lease_holders():
            try:
                rows = self._execute("SELECT pg_terminate_backend(%s)", (pid,))
                done = "done" if rows and rows[0][0] else "it had gone already"
            except pg_errors.InsufficientPrivilege as e:
                # Fenced all the same (the epoch moved): its next batch fails,
                # and it frees the lease then.
                done = f"not permitted ({str(e).strip()}); waiting for it to go"
            self.log.warn(
                "Taking over {where}: ending the session of the previous writer "
                "(server pid {pid}, {app} from {addr}): {done}",
                where=self.where, pid=pid, app=app or "?", addr=addr, done=done,
            )

    def _acquire_lease(self, key: int) -> None:
        conn = self._connect()
        conn.execute(f"SET lock_timeout = {max(1, int(self.lease_timeout * 1000))}")
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        except pg_errors.LockNotAvailable:
            holders = self.lease_holders()
            who = ", ".join(
                f"server pid {pid} ({app or 'no application_name'} from {addr}, since {start})"
                for pid, app, addr, start in holders
            ) or "a session that has just gone"
            if self.take_over:
                advice = (
                    "it is fenced already (the writer epoch moved), so it will fail its next "
                    "batch and let the lease go; try again then, or stop it"
                )
            else:
                advice = "stop it, or take over with --take-over (which fences it)"
            raise WriterActive(f"another writer holds the lease on {self.where}: {who}; {advice}") from None
        finally:
            if not conn.broken:  # else the error above is the one to report
                conn.execute("RESET lock_timeout")

    def _take_over(self) -> None:
        """
        Become the writer: bump the writer epoch in the meta table. Every
        append checks the epoch inside its transaction (``FOR SHARE``, so a
        take-over waits for a batch in progress and then fences the rest),
        so a stale writer that missed the take-over fails before it
        acknowledges anything more. Replay happens after this, so the new
        writer sees every batch the old one committed.
        """
        meta = self.meta_table
        self._execute(
            f"INSERT INTO {meta} (key, value) VALUES ('writer_epoch', '0') ON CONFLICT DO NOTHING"
        )
        ((epoch,),) = self._execute(
            f"UPDATE {meta} SET value = (value::bigint + 1)::text "
            f"WHERE key = 'writer_epoch' RETURNING value"
        )
        self.epoch = int(epoch)
        self.log.info(
            "Writer of {where} from epoch {epoch} on", where=self.where, epoch=self.epoch
        )

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None:
            return self._conn
        # The application name lets an operator tell the writer's session in pg_stat_activity.
        conn = pg_connect(self._dsn, application_name="txjournal writer")
        try:
            self._settle_durability(conn)
            with conn.transaction():
                conn.execute(
                    f"""CREATE TABLE IF NOT EXISTS {self.records_table} (
                        seq bigint PRIMARY KEY,
                        time_ns bigint NOT NULL,
                        kind integer NOT NULL,
                        name text NOT NULL,
                        version integer NOT NULL,
                        "user" text,
                        fields jsonb,
                        record bytea NOT NULL
                    )"""
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.meta_table} "
                    f"(key text PRIMARY KEY, value text NOT NULL)"
                )
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _settle_durability(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SHOW synchronous_commit").fetchone()
        current = row[0] if row else "on"
        if not self.sync:
            conn.execute("SET synchronous_commit = off")
        elif current == "off":
            # The server's default would acknowledge before the WAL is flushed.
            conn.execute("SET synchronous_commit = on")
        fsync = conn.execute("SHOW fsync").fetchone()
        if fsync and fsync[0] == "off":
            self.log.warn(
                "PostgreSQL at {where} runs with fsync = off: acknowledged commands can "
                "be lost if the server crashes",
                where=self.location,
            )

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._connect()
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []

    def _insert_batch(self, rows: list[Row], first_seq: int) -> None:
        conn = self._connect()
        last_seq = rows[-1][0]
        if len(rows) == 1:
            sql, values = self._append_one_sql, list[Any](rows[0])
        else:
            sql, values = self._append_sql, [list(column) for column in zip(*rows)]
        try:
            # One statement, so one round trip and one transaction: the epoch
            # is read FOR SHARE (a take-over waits for this batch, then fences
            # the next), and the insert happens only if both checks pass.
            row = conn.execute(
                sql, (*values, self.epoch, first_seq - 1, self.channel, str(last_seq))
            ).fetchone()
        except pg_errors.UniqueViolation as e:
            raise SequenceTaken(
                f"sequence numbers {first_seq}..{last_seq} collide with rows in "
                f"{self.where}: another writer is using the journal ({e})"
            ) from e
        except psycopg.OperationalError as e:
            # A writer taking over terminates this session: say so, rather
            # than leave the operator with a bare "connection terminated".
            current = self._epoch_elsewhere()
            if current is not None and current != self.epoch:
                raise Fenced(
                    f"another writer took over {self.where} (writer epoch {current}, this "
                    f"writer's {self.epoch}) after this writer's connection failed ({e}); "
                    f"this writer must stop{_FENCED_ADVICE}"
                ) from e
            raise
        inserted, current, newest = row[:3] if row else (0, None, None)
        if inserted == len(rows):
            return
        if current != self.epoch:
            raise Fenced(
                f"another writer took over {self.where} (writer epoch {current}, "
                f"this writer's {self.epoch}); this writer must stop{_FENCED_ADVICE}"
            )
        if newest != first_seq - 1:
            raise SequenceTaken(
                f"{self.where} ends at sequence number {newest}, so this writer "
                f"cannot append {first_seq}: another writer is using the journal"
            )
        raise SequenceTaken(f"{self.where} stored {inserted} of {len(rows)} rows of a batch")

    def _epoch_elsewhere(self) -> int | None:
        """The writer epoch read on a short-lived connection of its own; ``None`` if unreachable."""
        try:
            with pg_connect(self._dsn, connect_timeout="5") as conn:
                row = conn.execute(
                    f"SELECT value FROM {self.meta_table} WHERE key = 'writer_epoch'"
                ).fetchone()
        except psycopg.Error:
            return None
        return int(row[0]) if row else None

    def _after_failure(self) -> None:
        # Free the lease now: a writer that may not append must not look alive.
        self._close_connection()

    def _close_connection(self) -> None:
        self._leased = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
