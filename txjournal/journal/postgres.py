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
(the engine then stops accepting commands); nothing is retried, because
the outcome of a commit whose answer was lost is unknown. Restarting the
service reconnects and replays exactly what the server kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from zope.interface import implementer

from txjournal.interfaces import IJournal
from txjournal.journal.sql import Fenced, Row, SequenceTaken, SQLJournal

_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


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
    """

    param = "%s"

    def __init__(self, dsn: str, table_prefix: str = "txjournal", sync: bool = True) -> None:
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

    @property
    def backend_pid(self) -> int | None:
        """The server process serving this journal's connection, if connected."""
        return self._conn.info.backend_pid if self._conn is not None else None

    def open(self) -> None:
        super().open()
        self._take_over()

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
        conn = psycopg.connect(self._dsn, autocommit=True)
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
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(
                    f"SELECT value FROM {self.meta_table} WHERE key = 'writer_epoch' FOR SHARE"
                )
                epoch_row = cur.fetchone()
                current = int(epoch_row[0]) if epoch_row else 0
                if current != self.epoch:
                    raise Fenced(
                        f"another writer took over {self.where} (writer epoch {current}, "
                        f"this writer's {self.epoch}); this writer must stop"
                    )
                cur.execute(f"SELECT max(seq) FROM {self.records_table}")
                fetched = cur.fetchone()
                newest = fetched[0] if fetched and fetched[0] is not None else 0
                if newest != first_seq - 1:
                    raise SequenceTaken(
                        f"{self.where} ends at sequence number {newest}, so this writer "
                        f"cannot append {first_seq}: another writer is using the journal"
                    )
                cur.executemany(
                    f"INSERT INTO {self.records_table} VALUES "
                    f"(%s, %s, %s, %s, %s, %s, %s::jsonb, %s)",
                    rows,
                )
        except pg_errors.UniqueViolation as e:
            raise SequenceTaken(
                f"sequence numbers {first_seq}..{rows[-1][0]} collide with rows in "
                f"{self.where}: another writer is using the journal ({e})"
            ) from e

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
