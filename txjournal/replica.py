r"""
:class:`ReplicaService`: a read-only copy of a model, following the
PostgreSQL journal another process (the writer) appends to.

The journal is the unit of replication: a replica loads the newest
snapshot that loads (if it has a snapshot store), replays the journal from
there, then polls the records table every ``poll_interval`` seconds for
rows past the last one it applied, and applies them in order on the
reactor thread, exactly as start-up replay would. It serves the same read
API as :class:`~txjournal.service.JournalService` (``query``,
``query_as``, ``model``, ``schema``, ``running``), so the PB avatar works
unchanged; commands fail with :class:`ReadOnlyReplica`, naming the writer.

What a replica never does to the database: write, take the writer's lock,
create tables. Its connection runs with ``default_transaction_read_only``
on, and if the tables do not exist yet start-up fails (start the writer
first). A snapshot store is only read (``list``/``load``), but note that
:class:`~txjournal.snapshot.postgres.PostgresSnapshotStore` issues
``CREATE TABLE IF NOT EXISTS`` on connecting, so give it a role allowed to
run that, or no snapshot store.

Gaps are never applied: a missing sequence number (rows pruned before the
replica read them, or damage) or a record that does not verify stops
following with a logged error; the model stays at the last record applied
and :meth:`ReplicaService.when_applied` waiters fail. Restart the replica
(from a newer snapshot) to recover. Lost connections are retried at the
next poll.

Waking: the writer's every append sends ``NOTIFY <prefix>_appended``; a
replica ``LISTEN``\ s on a connection of its own, watched by the reactor
(no thread), and fetches at once when told. Polling stays as the fallback
(a lost listening connection, a proxy that drops notifications), so
``poll_interval`` bounds the lag whatever happens to notifications.

Promotion: :meth:`ReplicaService.promote` turns the running replica into
the writer in place, keeping its model: it takes the writer's lease (an
advisory lock, refused while a writer is alive unless ``take_over``, which
fences and ends that writer's session), bumps the writer epoch, replays
whatever it had not applied yet, and from then on executes commands and
takes snapshots like any :class:`~txjournal.service.JournalService`. No
acknowledged command is lost (the old writer can commit nothing once its
lease is gone or its epoch is stale, and the new one replays to the end
before it writes) and none is applied twice (the replica's model is at
exactly ``applied_seq``). With ``auto_promote`` a replica promotes itself
once no writer has held the lease for ``promote_grace`` seconds; with
several such replicas exactly one wins the lease, the others keep
following it.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import psycopg
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txjournal import record as rec
from txjournal.errors import (
    InvalidArguments,
    JournalCorrupt,
    NotRunning,
    ReadOnlyReplica,
    RecoveryError,
    SnapshotError,
    UnknownCommand,
)
from txjournal.interfaces import IJournalService, ISnapshotSerializer, ISnapshotStore
from txjournal.journal.postgres import PostgresJournal, pg_connect, read_only_session
from txjournal.readiness import Readiness
from txjournal.schema import Context, Schema
from txjournal.service import JournalService, load_newest_snapshot
from txjournal.snapshot.serializer import PickleSerializer

M = TypeVar("M")

#: Records fetched per poll at most: bounded memory and reactor pauses.
DEFAULT_MAX_BATCH = 5000


@implementer(ISnapshotStore)
class NoSnapshotStore:
    """
    Where a replica promoted without a snapshot store keeps its snapshots:
    nowhere. Start-up replays the whole journal; an explicit snapshot
    fails, naming the cause.
    """

    location = "<no snapshot store>"

    def list(self) -> builtins.list[int]:
        return []

    def load(self, seq: int) -> bytes:
        raise SnapshotError(f"no snapshot at {seq}: this writer has no snapshot store")

    def model_digest(self, seq: int) -> bytes:
        return self.load(seq)

    def save(self, seq: int, payload: bytes, model_digest: bytes | None = None) -> str:
        raise SnapshotError(
            "this writer (a promoted replica) has no snapshot store: give the replica one "
            "(--snapshots URL) to take snapshots after promotion"
        )

    def prune(self, keep: int) -> builtins.list[int]:
        return []


class _PromotedService(JournalService[M]):
    """A JournalService that starts from a replica's model instead of a snapshot."""

    def __init__(self, schema: Schema[M], model: M, seq: int, **kwargs: Any) -> None:
        # No full collection on the reactor thread in the middle of a failover.
        kwargs.setdefault("tune_gc", False)
        super().__init__(schema, **kwargs)
        self._start_from = (model, seq)

    def _load_snapshot(self, store: ISnapshotStore) -> tuple[M, int]:
        return self._start_from


@implementer(IReadDescriptor)
class _Listener:
    """
    Watches a connection that ran ``LISTEN`` from the reactor: readable
    means notifications (or the connection's end) arrived. Runs no query,
    so it never blocks the reactor.
    """

    def __init__(self, conn: psycopg.Connection[Any], woken: Callable[[], None], lost: Callable[[Failure], None]) -> None:
        self.conn = conn
        # The reactor watches a duplicate: libpq closes its own descriptor as
        # soon as it sees the server go, and the reactor must still be able to
        # unregister what it watches (epoll refuses a closed descriptor).
        self._fd = os.dup(conn.pgconn.socket)
        self._woken = woken
        self._lost = lost

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Close the watched duplicate and the connection; remove it from the reactor first."""
        fd, self._fd = self._fd, -1
        if fd != -1:
            os.close(fd)
        self.conn.close()

    def doRead(self) -> Failure | None:
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as e:
            return Failure(ConnectionLost(f"the listening connection failed: {e}"))
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            return Failure(ConnectionLost("the listening connection closed"))
        count = 0
        while pgconn.notifies() is not None:
            count += 1
        if count:
            self._woken()
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.close()
        self._lost(reason)

    def logPrefix(self) -> str:
        return "txjournal-listen"


class ReplicaJournal(PostgresJournal):
    """
    A :class:`PostgresJournal` that only reads: its session is read-only,
    it creates no tables (missing ones fail :meth:`open` clearly), inserts
    no ``journal_id`` and refuses :meth:`append` and :meth:`prune`.
    :meth:`replay` may be called again and again, each time from where the
    caller got to; a connection found broken is replaced on the next call.
    """

    def __init__(self, dsn: str, table_prefix: str = "txjournal") -> None:
        super().__init__(dsn, table_prefix=table_prefix, sync=True)
        self._closed = False

    def close(self) -> None:
        # Until the next open(): a fetch that runs late must not reconnect.
        self._closed = True
        super().close()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._conn = None
        if conn is not None:
            conn.close()
        if self._closed:
            raise NotRunning(f"the replica's connection to {self.location} was closed")
        conn = pg_connect(self._dsn)
        try:
            missing = read_only_session(conn, (self.records_table, self.meta_table))
            if missing:
                raise RecoveryError(
                    f"no journal to follow at {self.location}: table(s) {', '.join(missing)} "
                    f"do not exist; start the writer first (a replica never creates tables)"
                )
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def open(self) -> None:
        self._closed = False
        self._connect()
        self._failed = None
        rows = self._execute(f"SELECT value FROM {self.meta_table} WHERE key = %s", ("journal_id",))
        if not rows:
            raise RecoveryError(
                f"no journal to follow at {self.location}: {self.meta_table} holds no "
                f"journal_id; start the writer first"
            )
        self.journal_id = int(rows[0][0])
        self.salt = self.journal_id.to_bytes(8, "little")

    def listen(self) -> psycopg.Connection[Any]:
        """A new connection that has run ``LISTEN`` on the writer's channel (blocking)."""
        conn = pg_connect(self._dsn)
        try:
            conn.execute(f"LISTEN {self.channel}")
        except BaseException:
            conn.close()
            raise
        return conn

    def writer_alive(self) -> bool:
        """Whether a session holds the writer's lease (reads ``pg_locks``; takes no lock)."""
        return bool(self.lease_holders())

    def append(self, data: bytes, first_seq: int, last_seq: int) -> None:
        raise ReadOnlyReplica(self.where, "append refused")

    def prune(self, upto_seq: int) -> list[str]:
        raise ReadOnlyReplica(self.where, "prune refused")

    def position(self, applied: int) -> tuple[int, int, int | None]:
        """
        ``(newest seq, its time_ns, time_ns of row applied or None)``; the
        newest is ``(0, 0)`` for an empty table.
        """
        rows = self._execute(
            f"SELECT seq, time_ns FROM {self.records_table} "
            f"WHERE seq = %s OR seq = (SELECT max(seq) FROM {self.records_table})",
            (applied,),
        )
        by_seq = {int(s): int(t) for s, t in rows}
        newest = max(by_seq, default=0)
        return newest, by_seq.get(newest, 0), by_seq.get(applied)


@implementer(IJournalService)
class ReplicaService(Service, Generic[M]):
    """
    Follows the writer's PostgreSQL journal; serves queries, refuses commands.

    :param journal: a ``postgresql://`` URL or libpq connection string, a
        :class:`ReplicaJournal`, or a :class:`PostgresJournal` (only its
        connection string and table prefix are used; it is never opened).
    :param snapshots: a snapshot store to start from (only read); ``None``
        replays the whole journal.
    :param poll_interval: seconds between polls for new records.
    :param table_prefix: used when ``journal`` is a URL.
    :param max_batch: at most this many records are fetched and applied
        per poll (a replica far behind catches up over several polls).
    :param listen: wake on the writer's ``NOTIFY`` as well as polling.
    :param auto_promote: become the writer once no writer has held the
        lease for ``promote_grace`` seconds (checked at every poll).
    :param writer_options: keyword arguments of
        :class:`~txjournal.service.JournalService` for the writer this
        replica becomes when promoted (``snapshot_interval``,
        ``keep_snapshots``, ``max_pending``, ``sync``...).
    :param lease_timeout: seconds promotion waits for the writer's lease.
    """

    log = Logger()

    def __init__(
        self,
        schema: Schema[M],
        journal: str | PostgresJournal,
        snapshots: ISnapshotStore | None = None,
        poll_interval: float = 0.5,
        reactor: Any = None,
        *,
        table_prefix: str = "txjournal",
        serializer: ISnapshotSerializer | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        listen: bool = True,
        auto_promote: bool = False,
        promote_grace: float = 1.0,
        writer_options: dict[str, Any] | None = None,
        lease_timeout: float = 10.0,
    ) -> None:
        if promote_grace < 0:
            raise ValueError("promote_grace must not be negative")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if isinstance(journal, ReplicaJournal):
            self.journal = journal
        elif isinstance(journal, PostgresJournal):
            self.journal = ReplicaJournal(journal._dsn, journal.table_prefix)
        elif isinstance(journal, str):
            self.journal = ReplicaJournal(journal, table_prefix)
        else:
            raise TypeError(f"journal must be a PostgreSQL URL or a PostgresJournal, not {journal!r}")
        self.schema = schema
        self.snapshots = snapshots
        self.poll_interval = poll_interval
        self.serializer: ISnapshotSerializer = serializer or PickleSerializer()
        self.max_batch = max_batch
        self._reactor = reactor
        self._model: M | None = None
        self._readiness = Readiness()
        self._applied_waiters: list[tuple[int, Deferred[int]]] = []
        self._db_lock = DeferredLock()
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[Any] | None = None
        #: Why following stopped for good (a gap, damage, an unknown command).
        self.halted: Failure | None = None
        #: Sequence number of the last record applied (or covered by the snapshot).
        self.applied_seq = 0
        self.applied_time_ns = 0
        #: The writer's newest sequence number (and its time) at the last poll.
        self.writer_last_seq = 0
        self.writer_last_time_ns = 0
        self.loaded_snapshot_seq = 0
        #: Records applied since start-up, replay included.
        self.replayed = 0
        self.listen = listen
        self.auto_promote = auto_promote
        self.promote_grace = promote_grace
        self.writer_options = dict(writer_options or {})
        self.lease_timeout = lease_timeout
        self._listener: _Listener | None = None
        #: Set while a stop is finishing (a start then is refused).
        self._stopping: Readiness | None = None
        self._listening: Deferred[None] | None = None
        self._wake_queued = False
        self._wake_again = False
        #: Notifications that woke a fetch (for tests and the curious).
        self.wakeups = 0
        self._writer_absent_since: float | None = None
        self._promoted_waiters: list[Deferred[None]] = []
        self._writer: _PromotedService[M] | None = None
        self._promoting: Deferred[None] | None = None
        #: Seconds the last promotion took (lease, epoch, catch-up replay).
        self.promotion_seconds: float | None = None

    # -- helpers ------------------------------------------------------------------

    @property
    def writer(self) -> str:
        """Where the writer's journal is, without any password."""
        return self.journal.where

    def _get_reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        reactor = self._get_reactor()
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    @property
    def model(self) -> M:
        """The replicated model, as of :attr:`applied_seq`. Read it only."""
        if self._writer is not None:
            return self._writer.model
        if self._model is None:
            raise NotRunning("the replica has not finished starting")
        return self._model

    # -- life cycle ---------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            raise RuntimeError("the replica is already running")
        if self._stopping is not None:
            # That stop will close the journal and store a start opens now.
            raise RuntimeError(
                "the replica is still stopping: start it again once the Deferred "
                "from stopService() has fired"
            )
        try:
            self._start()
        except BaseException:
            failure = Failure()
            self._model = None
            self._release()
            self._readiness.failed(failure)
            raise
        Service.startService(self)
        self.resume_following()
        self._readiness.succeeded()

    def _start(self) -> None:
        # Synchronous, like JournalService: a PB listener started after this
        # service never sees a half-built model, and twistd sees failures.
        self.halted = None
        self.journal.open()
        model, snap_seq = self._load_snapshot()
        self.loaded_snapshot_seq = self.applied_seq = snap_seq
        self.applied_time_ns = 0
        self._model = model
        self.replayed = 0
        self._apply(self.journal.replay(snap_seq + 1))
        newest, newest_ns, applied_ns = self.journal.position(self.applied_seq)
        self._note_position(newest, newest_ns, applied_ns)
        self.log.info(
            "Replica of {writer} ready: snapshot at {snap}, {count} records replayed, "
            "at sequence number {seq}",
            writer=self.writer, snap=snap_seq, count=self.replayed, seq=self.applied_seq,
        )

    def _load_snapshot(self) -> tuple[M, int]:
        return load_newest_snapshot(self.schema, self.snapshots, self.serializer, self.log)

    def stopService(self) -> Deferred[None]:
        if self._stopping is not None:
            return self._stopping.wait()
        stopping = self._stopping = Readiness()
        d = self._stop_service()

        def stopped(result: object) -> object:
            self._stopping = None
            stopping.succeeded()
            return result

        return d.addBoth(stopped)

    def _stop_service(self) -> Deferred[None]:
        Service.stopService(self)
        self._stop_listening()
        promoting = self._promoting
        if promoting is not None:
            # Let it finish (it sees the service stopped and backs out, or
            # it had already become the writer), then stop what is left.
            settled: Deferred[None] = Deferred()

            def relay(result: object) -> object:
                settled.callback(None)
                return result

            promoting.addBoth(relay)
            return settled.addCallback(lambda _: self._stop())
        return self._stop()

    def _stop(self) -> Deferred[None]:
        writer = self._writer
        if writer is not None:
            d0 = writer.stopService()
            d0.addErrback(lambda f: self.log.failure("Error while stopping the promoted writer", f))
            return d0
        d = self.pause_following()

        def release(_: object) -> Deferred[None]:
            # Under the lock: no fetch is using the connection any more.
            return self._db_lock.run(self._release)

        d.addCallback(release)
        d.addErrback(lambda f: self.log.failure("Error while stopping the replica", f))
        return d

    def _release(self) -> None:
        self._stop_listening()
        self.journal.close()
        if self._writer is not None:
            return  # the writer owns the snapshot store now
        close_store = getattr(self.snapshots, "close", None)
        if close_store is not None:
            close_store()
        self._fail_applied_waiters(Failure(NotRunning("the replica stopped")))

    def when_ready(self) -> Deferred[None]:
        """Fire once start-up replay has finished (errback if start-up failed)."""
        return self._readiness.wait()

    def when_applied(self, seq: int) -> Deferred[int]:
        """
        Fire with :attr:`applied_seq` once the record ``seq`` is applied;
        fail if following stops (a gap, damage) or the replica stops first.
        """
        if self._writer is not None:
            applied = self._writer.engine.applied_seq
            if applied >= seq:
                return succeed(applied)
            return fail(self._not_following(seq, applied))
        if self._model is not None and self.applied_seq >= seq:
            return succeed(self.applied_seq)
        if self.halted is not None:
            return fail(self.halted)
        d: Deferred[int] = Deferred()
        self._applied_waiters.append((seq, d))
        return d

    # -- following ----------------------------------------------------------------

    @property
    def following(self) -> bool:
        return self._loop is not None and self._loop.running

    def pause_following(self) -> Deferred[None]:
        """Stop polling; fires once a poll in progress has finished."""
        loop, done = self._loop, self._loop_done
        self._loop = self._loop_done = None
        if loop is not None and loop.running:
            loop.stop()
        d: Deferred[Any] = done if done is not None else succeed(None)
        return d.addBoth(lambda _: None)

    def resume_following(self) -> None:
        """Poll again (after :meth:`pause_following`); nothing once halted."""
        if self.following or self.halted is not None or not self.running:
            return
        loop = LoopingCall(self._poll)
        loop.clock = self._get_reactor()
        self._loop = loop
        self._loop_done = loop.start(self.poll_interval, now=True)

    # -- waking on NOTIFY ---------------------------------------------------------

    def _start_listening(self) -> None:
        """Open the LISTEN connection in a thread and watch it from the reactor."""
        if not self.listen or self._listener is not None or self._listening is not None:
            return
        if self._writer is not None or self.halted is not None or not self.running:
            return
        d = self._in_thread(self.journal.listen)
        self._listening = d

        def listening(conn: psycopg.Connection[Any]) -> None:
            self._listening = None
            if not self.following:
                conn.close()  # stopped or promoted meanwhile
                return
            listener = _Listener(conn, self._wake, self._listener_lost)
            self._listener = listener
            self._get_reactor().addReader(listener)
            self.log.debug("Replica of {writer}: listening for appends", writer=self.writer)
            self._wake()  # anything committed before LISTEN took effect

        def failed(f: Failure) -> None:
            self._listening = None
            self.log.warn(
                "Replica of {writer}: cannot listen for appends ({error}); polling every "
                "{interval}s, trying again at the next poll",
                writer=self.writer, error=f.getErrorMessage(), interval=self.poll_interval,
            )

        d.addCallbacks(listening, failed)

    def _listener_lost(self, reason: Failure) -> None:
        self._listener = None
        if self.following:
            self.log.warn(
                "Replica of {writer}: the listening connection was lost ({error}); polling "
                "until it is back", writer=self.writer, error=reason.getErrorMessage(),
            )

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self._get_reactor().removeReader(listener)
            listener.close()

    def _wake(self) -> None:
        """
        A notification: fetch now. Notifications arriving while a fetch is
        queued or running make exactly one more fetch after it (that fetch
        may have started before their commit).
        """
        if not self.following:
            return
        if self._wake_queued:
            self._wake_again = True
            return
        self._wake_queued = True
        self.wakeups += 1

        def done(_: object) -> None:
            self._wake_queued = False
            if self._wake_again:
                self._wake_again = False
                self._wake()

        self._poll().addBoth(done)

    def _poll(self) -> Deferred[None]:
        if self._listener is None:
            self._start_listening()
        d = self._db_lock.run(self._poll_locked)
        d.addErrback(self._poll_failed)
        return d

    def _poll_locked(self) -> Deferred[None]:
        if self._promoting is not None or self._writer is not None:
            return succeed(None)  # promotion owns the connection now
        applied = self.applied_seq
        d = self._in_thread(self._fetch, applied)
        d.addCallback(self._fetched, applied)
        return d

    def _fetch(
        self, applied: int
    ) -> tuple[list[rec.Record], tuple[int, int, int | None], bool]:
        """
        In a pool thread: up to ``max_batch`` records past ``applied``, the
        writer's position and (with ``auto_promote``) whether a writer holds
        the lease.
        """
        records: list[rec.Record] = []
        replay = self.journal.replay(applied + 1)
        try:
            for record in replay:
                records.append(record)
                if len(records) >= self.max_batch:
                    break
        finally:
            close = getattr(replay, "close", None)  # a generator: release its cursor state now
            if close is not None:
                close()
        alive = self.journal.writer_alive() if self.auto_promote else True
        return records, self.journal.position(applied), alive

    def _fetched(
        self, result: tuple[list[rec.Record], tuple[int, int, int | None], bool], applied: int
    ) -> None:
        records, (newest, newest_ns, applied_ns), alive = result
        if self._model is None or self.applied_seq != applied or self._writer is not None:
            return  # stopped, restarted or promoted meanwhile: this batch is stale
        self._apply(records)
        self._note_position(newest, newest_ns, applied_ns)
        self._fire_applied_waiters()
        if self.auto_promote:
            self._consider_promotion(alive)

    def _consider_promotion(self, writer_alive: bool) -> None:
        if writer_alive:
            self._writer_absent_since = None
            return
        now = self._get_reactor().seconds()
        if self._writer_absent_since is None:
            self._writer_absent_since = now
            self.log.warn(
                "Replica of {writer}: no writer holds the lease; promoting this replica "
                "in {grace}s unless one comes back", writer=self.writer, grace=self.promote_grace,
            )
        if now - self._writer_absent_since >= self.promote_grace and self._promoting is None:
            self._get_reactor().callLater(0, self._auto_promote)

    def _auto_promote(self) -> None:
        if self._writer is not None or self._promoting is not None or not self.running:
            return

        def lost(f: Failure) -> None:
            # Another replica won the lease, or the old writer came back.
            self._writer_absent_since = None
            self.log.info(
                "Replica of {writer} stays a replica: {error}",
                writer=self.writer, error=f.getErrorMessage(),
            )

        # No waiting for the lease: the replicas that lose the race go back
        # to following at once instead of standing still for lease_timeout.
        self._promote(False, 0.0).addErrback(lost)

    def _note_position(self, newest: int, newest_ns: int, applied_ns: int | None) -> None:
        # The writer's newest row never goes away (pruning keeps it).
        if newest >= self.applied_seq:
            self.writer_last_seq, self.writer_last_time_ns = newest, newest_ns
        else:
            self.writer_last_seq, self.writer_last_time_ns = self.applied_seq, self.applied_time_ns
        if not self.applied_time_ns and applied_ns is not None:
            self.applied_time_ns = applied_ns

    def _poll_failed(self, failure: Failure) -> None:
        if failure.check(JournalCorrupt, RecoveryError, ReadOnlyReplica):
            self._halt(failure)
        else:
            # A lost connection or a server restart: try again at the next poll.
            self.log.warn(
                "Replica of {writer}: polling failed ({error}); retrying in {interval}s",
                writer=self.writer, error=f"{type(failure.value).__name__}: {failure.value}",
                interval=self.poll_interval,
            )

    def _halt(self, failure: Failure) -> None:
        self.halted = failure
        self._stop_listening()
        self.log.failure(
            "Replica of {writer} stopped following at sequence number {seq}: the model "
            "stays as of that record; restart the replica (from a newer snapshot) to recover",
            failure, writer=self.writer, seq=self.applied_seq,
        )
        loop = self._loop
        if loop is not None and loop.running:
            loop.stop()
        self._fail_applied_waiters(failure)

    def _fail_applied_waiters(self, failure: Failure) -> None:
        waiters, self._applied_waiters = self._applied_waiters, []
        for _, d in waiters:
            d.errback(failure)

    def _fire_applied_waiters(self) -> None:
        ready = [(s, d) for s, d in self._applied_waiters if s <= self.applied_seq]
        if ready:
            self._applied_waiters = [(s, d) for s, d in self._applied_waiters if s > self.applied_seq]
            for _, d in ready:
                d.callback(self.applied_seq)

    def _apply(self, records: Iterable[rec.Record]) -> None:
        """Apply records in order, exactly as JournalService's replay does."""
        model = self._model
        schema = self.schema
        journal_id = self.journal.journal_id
        for record in records:
            expected = self.applied_seq + 1
            if record.seq != expected:
                raise JournalCorrupt(
                    self.journal.where, 0, expected,
                    f"the replica got record {record.seq} where {expected} belongs",
                )
            if record.kind not in (rec.KIND_COMMAND, rec.KIND_QUERY):
                raise RecoveryError(
                    f"record {record.seq} has kind {record.kind}, unknown to this version "
                    f"of txjournal: upgrade the replica"
                )
            if record.kind == rec.KIND_COMMAND and not schema.is_retired(record.name):
                try:
                    command = schema.decode(record.name, record.version, record.fields)
                except (UnknownCommand, InvalidArguments) as e:
                    raise RecoveryError(
                        f"cannot apply record {record.seq} (command {record.name!r} "
                        f"version {record.version}): {e}; is this replica running older code "
                        f"than the writer?"
                    ) from None
                try:
                    command.execute(model, Context(record.seq, record.time_ns, journal_id, record.user))  # type: ignore[attr-defined]
                except Exception as e:
                    # Part of history: the live run failed the same way.
                    self.log.debug(
                        "Replicated command {seq} ({name}) raised {error!r}, as it did live",
                        seq=record.seq, name=record.name, error=e,
                    )
            self.applied_seq = record.seq
            self.applied_time_ns = record.time_ns
            self.replayed += 1

    # -- promotion ----------------------------------------------------------------

    @property
    def engine(self) -> Any:
        """The writer's engine once promoted (:class:`NotRunning` before)."""
        if self._writer is None:
            raise NotRunning("a replica has no engine: it applies the writer's records")
        return self._writer.engine

    @property
    def promoted(self) -> bool:
        """Whether this replica has become the writer."""
        return self._writer is not None

    def when_promoted(self) -> Deferred[None]:
        """Fire once this replica is the writer (by :meth:`promote` or automatically)."""
        if self._writer is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._promoted_waiters.append(d)
        return d

    def _not_following(self, seq: int, applied: int) -> NotRunning:
        return NotRunning(
            f"this replica became the writer at sequence number {applied}: record {seq} "
            f"will exist once a command is executed here"
        )

    def promote(self, take_over: bool = False) -> Deferred[None]:
        """
        Become the writer of the journal this replica follows, keeping the
        model. Fires once commands are accepted; fails (and the replica
        goes on following) if a writer holds the lease and ``take_over``
        is false, or if the lease does not come within ``lease_timeout``.

        :param take_over: fence a live writer (bump the epoch so its next
            batch fails, end its database session) instead of refusing.
        """
        return self._promote(take_over, self.lease_timeout)

    def _promote(self, take_over: bool, lease_timeout: float) -> Deferred[None]:
        if self._writer is not None:
            return succeed(None)
        if self._promoting is not None:
            waiting: Deferred[None] = Deferred()

            def relay(result: object) -> object:
                if isinstance(result, Failure):
                    waiting.errback(result)
                else:
                    waiting.callback(None)
                return result

            self._promoting.addBoth(relay)
            return waiting
        if self._model is None or not self.running:
            return fail(NotRunning("the replica is not running"))
        if self.halted is not None:
            return fail(RecoveryError(
                f"the replica stopped following at sequence number {self.applied_seq} "
                f"({self.halted.getErrorMessage()}); restart it instead of promoting it"
            ))
        started = time.monotonic()
        self.log.info(
            "Promoting the replica of {writer} at sequence number {seq}{how}",
            writer=self.writer, seq=self.applied_seq,
            how=" (taking over from a live writer)" if take_over else "",
        )
        was_following = self.following
        self._stop_listening()
        d: Deferred[Any] = self.pause_following()
        d.addCallback(lambda _: self._db_lock.run(self._open_writer_locked, take_over, lease_timeout))
        d.addCallback(self._become_writer, started)

        def refused(f: Failure) -> Failure:
            self._promoting = None
            if self._writer is None and self.halted is None and self.running and was_following:
                self.resume_following()
            self.log.warn(
                "Promotion of the replica of {writer} failed: {error}",
                writer=self.writer, error=f.getErrorMessage(),
            )
            return f

        def done(result: None) -> None:
            self._promoting = None
            return result

        d.addCallbacks(done, refused)
        self._promoting = d
        return d

    def _open_writer_locked(self, take_over: bool, lease_timeout: float) -> Deferred[PostgresJournal]:
        # Read under the lock: a fetch that held it may just have applied more.
        return self._in_thread(self._open_writer_journal, take_over, lease_timeout, self.applied_seq)

    def _open_writer_journal(self, take_over: bool, lease_timeout: float, applied: int) -> PostgresJournal:
        """
        In a pool thread: take the lease and the next writer epoch, and
        fetch the records past ``applied`` (the replica is paused), so that
        the catch-up on the reactor thread applies them without waiting
        for the database.
        """
        journal = PostgresJournal(
            self.journal._dsn, self.journal.table_prefix,
            sync=self.writer_options.get("sync", True),
            take_over=take_over, lease_timeout=lease_timeout,
        )
        try:
            journal.open()
            journal.prefetch(applied + 1)
        except BaseException:
            journal.close()
            raise
        return journal

    def _become_writer(self, journal: PostgresJournal, started: float) -> None:
        """On the reactor: replay what was not applied yet, start accepting commands."""
        model = self._model
        if not self.running or model is None:
            journal.close()  # frees the lease
            raise NotRunning("the replica stopped while it was being promoted")
        from_seq = self.applied_seq
        options = dict(self.writer_options)
        store: ISnapshotStore = self.snapshots if self.snapshots is not None else NoSnapshotStore()
        if self.snapshots is None:
            options["snapshot_on_stop"] = False
            options["snapshot_interval"] = None
        writer: _PromotedService[M] = _PromotedService(
            self.schema, model, from_seq, journal=journal, snapshots=store,
            reactor=self._reactor, serializer=self.serializer, **options,
        )
        try:
            writer.startService()
        except BaseException:
            # The epoch was bumped and the model may have moved past
            # applied_seq: this process can neither write nor follow.
            # (startService released the journal, and with it the lease.)
            self._halt(Failure())
            raise
        # The model has moved past applied_seq: from here on this process is
        # the writer, whatever else goes wrong (following again would apply
        # the caught-up records a second time).
        self._writer = writer
        try:
            self._after_promotion(writer, journal, store, started)
        except Exception:
            self.log.failure("Error after promotion (this process is the writer nonetheless)")

    def _after_promotion(
        self, writer: _PromotedService[M], journal: PostgresJournal, store: ISnapshotStore, started: float
    ) -> None:
        try:
            newest = max(store.list(), default=0)
        except Exception:
            self.log.failure("Could not list snapshots after promotion; the next one will be written")
            newest = -1
        # No snapshot at the replica's position may exist yet: let the next one be written.
        writer.last_snapshot_seq = newest
        # Under the lock: a lag check queued meanwhile may be using it.
        self._db_lock.run(self.journal.close).addErrback(
            lambda f: self.log.failure("Closing the replica's connection failed", f)
        )
        self.promotion_seconds = time.monotonic() - started
        self.log.info(
            "Promoted: this process is now the writer of {where} (writer epoch {epoch}); "
            "{count} records caught up on promotion, next sequence number {seq}; took {took:.3f}s",
            where=journal.where, epoch=journal.epoch, count=writer.replayed,
            seq=journal.next_seq, took=self.promotion_seconds,
        )
        applied = writer.engine.applied_seq
        waiting, self._applied_waiters = self._applied_waiters, []
        for seq, d in waiting:
            if seq <= applied:
                d.callback(applied)
            else:
                d.errback(self._not_following(seq, applied))
        promoted, self._promoted_waiters = self._promoted_waiters, []
        for done in promoted:
            done.callback(None)

    # -- lag ----------------------------------------------------------------------

    def lag(self) -> dict[str, Any]:
        """
        How far behind the writer this replica is, as of the last poll:
        ``seq_behind`` records, ``seconds_behind`` between the writer's
        newest record and the last one applied (both times as the writer
        logged them, so clock skew does not enter; ``None`` if the time of
        the applied record is unknown), ``last_applied_seq``,
        ``writer_last_seq``. Use :meth:`check_lag` for a fresh reading.
        """
        if self._writer is not None:
            applied = self._writer.engine.applied_seq
            return {"seq_behind": 0, "seconds_behind": 0.0, "last_applied_seq": applied, "writer_last_seq": applied}
        behind = max(0, self.writer_last_seq - self.applied_seq)
        seconds: float | None = 0.0
        if behind:
            seconds = (
                max(0.0, (self.writer_last_time_ns - self.applied_time_ns) / 1e9)
                if self.applied_time_ns else None
            )
        return {
            "seq_behind": behind,
            "seconds_behind": seconds,
            "last_applied_seq": self.applied_seq,
            "writer_last_seq": self.writer_last_seq,
        }

    def check_lag(self) -> Deferred[dict[str, Any]]:
        """Ask the database for the writer's position now (applies nothing); Deferred of :meth:`lag`."""
        if self._writer is not None or self._promoting is not None:
            return succeed(self.lag())
        if self._model is None:
            return fail(NotRunning("the replica is not running"))
        applied = self.applied_seq
        d = self._db_lock.run(self._in_thread, self.journal.position, applied)

        def got(position: tuple[int, int, int | None]) -> dict[str, Any]:
            self._note_position(*position)
            return self.lag()

        return d.addCallback(got)

    # -- commands and queries -----------------------------------------------------

    def execute(self, command: Any, user: str | None = None) -> Deferred[Any]:
        if self._writer is not None:
            return self._writer.execute(command, user)
        name = getattr(type(command), "__name__", repr(command))
        return fail(ReadOnlyReplica(self.writer, f"command {name} refused"))

    def execute_named(self, name: str, kwargs: dict[str, Any], user: str | None = None) -> Deferred[Any]:
        if self._writer is not None:
            return self._writer.execute_named(name, kwargs, user)
        return fail(ReadOnlyReplica(self.writer, f"command {name!r} refused"))

    def snapshot(self) -> Deferred[int]:
        if self._writer is not None:
            return self._writer.snapshot()
        return fail(ReadOnlyReplica(self.writer, "snapshot refused (the writer takes snapshots)"))

    def query(self, query: object, /, **kwargs: Any) -> Any:
        """Run a named query with ``kwargs``, or call ``query(model)``."""
        if self._writer is not None:
            return self._writer.query(query, **kwargs)
        model = self.model
        if callable(query):
            return query(model, **kwargs)
        if not isinstance(query, str):
            raise TypeError(f"query must be a registered name or a callable, not {query!r}")
        return self._run_query(query, kwargs)

    def query_as(self, user: str | None, name: str, kwargs: dict[str, Any]) -> Deferred[Any]:
        """Run the named query; a Deferred, like the writer's (``user`` is not recorded)."""
        if self._writer is not None:
            return self._writer.query_as(user, name, kwargs)
        try:
            self.model  # noqa: B018 - raises NotRunning before start
            return succeed(self._run_query(name, kwargs))
        except Exception:
            return fail()

    def _run_query(self, name: str, kwargs: dict[str, Any]) -> Any:
        schema = self.schema
        if schema.query_type(name).audit:
            raise ReadOnlyReplica(
                self.writer, f"query {name!r} is audited and its audit record needs the writer"
            )
        return schema.bind_query(name, kwargs)(self.model)
