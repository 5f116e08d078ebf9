"""
:class:`JournalService`: the journal as a Twisted service.

Start-up (lock, snapshot load, replay) runs synchronously inside
``startService`` on purpose: ``MultiService`` ignores Deferreds returned by
its children, so only a synchronous exception makes ``twistd`` report a
failed start, and only a synchronous replay guarantees that services added
after this one (a PB listener) never see a half-built model.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgpack
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txjournal.engine import DEFAULT_MAX_PENDING, Engine, Runner
from txjournal.errors import (
    InvalidArguments,
    NotRunning,
    RecoveryError,
    SnapshotError,
    UnknownCommand,
    UnsafeDataDir,
)
from txjournal.fs import DIR_MODE, check_private_dir
from txjournal.interfaces import (
    IFileSystem,
    IJournal,
    IJournalService,
    ISnapshotSerializer,
    ISnapshotStore,
)
from txjournal.journal.file import DEFAULT_SEGMENT_SIZE, FileJournal
from txjournal.lock import DataDirLock
from txjournal.readiness import Readiness
from txjournal.record import KIND_COMMAND, KIND_QUERY, RecordTuple
from txjournal.replaying import Plan, apply_run
from txjournal.schema import Context, Schema
from txjournal.snapshot import fork as forked
from txjournal.snapshot import replayed
from txjournal.snapshot.file import FileSnapshotStore
from txjournal.snapshot.serializer import PickleSerializer
from txjournal.writer import WriterThread

M = TypeVar("M")
_T = TypeVar("_T")

_PROGRESS_EVERY = 5.0  # seconds between progress messages during replay


@implementer(IJournalService)
class JournalService(Service, Generic[M]):
    """
    Keeps ``schema``'s model in memory, durable through a command journal.

    :param datadir: directory holding ``LOCK``, ``journal/`` and
        ``snapshots/``; created with mode 0700.
    :param sync: ``False`` acknowledges commands before they are on stable
        storage. **Unsafe**: a power failure loses acknowledged commands.
        Only for tests and benchmarks.
    :param snapshot_interval: seconds between automatic snapshots (``None``
        or 0 for none).
    :param snapshot_on_stop: write a snapshot on a clean shutdown, so the
        next start replays nothing.
    :param keep_snapshots: how many snapshots to keep.
    :param snapshot_fork: write snapshots from a forked child (POSIX, file
        snapshot store) so the reactor pauses only for the ``fork()``, not
        for serializing the model; costs up to the model's size in extra
        memory while the child runs. ``False`` serializes on the reactor
        thread and writes from the snapshot thread.
    :param snapshot_app: the schema's import path, ``"package.module:schema"``
        (file journal and snapshots under ``datadir`` only). Given, snapshots
        are written by a new Python process (started with ``posix_spawn``)
        that loads the newest snapshot and replays the journal up to the
        sequence number asked for, so the reactor pauses only to start it
        (1-4 ms), not for a ``fork()`` (20-25 ms per GiB of process here); it costs the
        CPU and time of that load and replay, and memory for a second model
        while the process runs. The process imports the application anew
        and refuses to replay if the modules of the schema and its commands
        changed on disk since the service started. Takes precedence over
        ``snapshot_fork``. See :mod:`txjournal.snapshot.replayed`. If the
        process fails before writing (the application does not import or
        changed, the journal it needs was pruned past a damaged snapshot),
        a snapshot of the live model is written instead (forked or not, as
        ``snapshot_fork`` says), with a warning. ``stopService`` ends a
        replaying process and takes its stop snapshot of the live model.
    :param snapshot_timeout: seconds after which a snapshot process (forked
        or replaying) is killed and its snapshot fails, so that a hung one
        cannot stop snapshots or ``stopService`` for ever; ``None`` or 0 for
        no limit.
    :param audit_queries: record every named query in the journal (who,
        which query, arguments, time) as a record that replay skips.
        Queries registered with ``audit=True`` are recorded regardless.
    :param prune_segments: after each snapshot, delete journal segments
        wholly covered by the oldest kept snapshot. Off by default: the full
        history lets new code rebuild its model from scratch.
    :param max_pending: how many commands may wait for the disk before
        ``execute`` fails with :class:`~txjournal.errors.JournalOverloaded`.
    :param inline_commit: under light load, write and sync a small batch on
        the reactor thread instead of handing it to the writer thread (file
        journal only): a lone caller's latency drops to about that of the
        sync itself, two thread wake-ups less, for a reactor stall of one
        sync. A sync slower than 20 ms turns it off for 10 s. ``False``
        keeps every sync off the reactor thread.
    :param tune_gc: tune CPython's cyclic garbage collector for a
        prevalent model, once start-up has loaded it (process-wide: the
        collector has no per-object settings). Every object alive then is
        :func:`frozen <gc.freeze>`, after collecting the young generations, so that full
        passes, which walk every tracked object and stall the reactor about
        a second per few million, leave the model out; and the first
        generation's threshold is raised to 50,000 allocations (from 700),
        because under load each command's objects wait for the disk across
        so many allocations that the default promotes nearly all of them
        and triggers a full pass every few thousand commands (measured:
        15% of the CPU at 1,000 callers, 1% with this). Frozen objects are
        still freed by reference counting; only reference *cycles* among
        them that become garbage are not reclaimed until a service of the
        process stops and another starts, or the last one stops,
        so a model with cycles may keep up to its start-up size of such
        garbage (``gc.unfreeze()`` and ``gc.collect()`` at a quiet time
        reclaim it; or pass ``False``). Several services in one process
        share the tuning: the last one to stop unfreezes and puts the
        threshold back, and a service started after any has stopped first
        runs a full pass, so a restarted service does not keep its
        predecessor's model.
    :param journal: a journal backend to use instead of the file journal
        under ``datadir``.
    :param snapshots: a snapshot store to use instead of files under
        ``datadir``.
    :param fs: the file-system seam of the file backends (tests inject
        faults through it).
    :param runner: runs a blocking call off the reactor thread and returns
        a Deferred (tests pass a synchronous one); by default a dedicated
        one-thread pool, the single writer.
    """

    log = Logger()

    def __init__(
        self,
        schema: Schema[M],
        datadir: str | None = None,
        *,
        sync: bool = True,
        snapshot_interval: float | None = None,
        snapshot_on_stop: bool = True,
        keep_snapshots: int = 3,
        prune_segments: bool = False,
        audit_queries: bool = False,
        snapshot_fork: bool = True,
        snapshot_app: str | None = None,
        snapshot_timeout: float | None = 3600.0,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        inline_commit: bool = True,
        tune_gc: bool = True,
        serializer: ISnapshotSerializer | None = None,
        journal: IJournal | None = None,
        snapshots: ISnapshotStore | None = None,
        reactor: Any = None,
        runner: Runner | None = None,
        fs: IFileSystem | None = None,
    ) -> None:
        if datadir is None and (journal is None or snapshots is None):
            raise ValueError("give a datadir, or both a journal and a snapshot store")
        if keep_snapshots < 1:
            raise ValueError("keep_snapshots must be at least 1")
        self.schema = schema
        self.datadir = os.path.abspath(datadir) if datadir is not None else None
        self.sync = sync
        self.snapshot_interval = snapshot_interval
        self.snapshot_on_stop = snapshot_on_stop
        self.keep_snapshots = keep_snapshots
        self.prune_segments = prune_segments
        self.audit_queries = audit_queries
        self.snapshot_fork = snapshot_fork
        if snapshot_app is not None:
            module, sep, attr = snapshot_app.partition(":")
            if not sep or not module or not attr or module == "__main__":
                raise ValueError(
                    f"snapshot_app must name an importable schema as "
                    f"'package.module:attribute', got {snapshot_app!r}"
                )
            if datadir is None or journal is not None or snapshots is not None:
                raise ValueError(
                    "snapshot_app needs the file journal and snapshots of a datadir"
                )
            if serializer is not None and not isinstance(serializer, PickleSerializer):
                raise ValueError("snapshot_app writes snapshots with the default serializer")
        self.snapshot_app = snapshot_app
        self.snapshot_timeout = snapshot_timeout
        self.segment_size = segment_size
        self.max_pending = max_pending
        self.inline_commit = inline_commit
        self.tune_gc = tune_gc
        self._gc_frozen = False
        self.serializer: ISnapshotSerializer = serializer or PickleSerializer()
        self._journal_given = journal
        self._snapshots_given = snapshots
        self._reactor = reactor
        self._runner_given = runner
        self._fs = fs
        self._readiness = Readiness()
        self._engine: Engine[M] | None = None
        self._journal: IJournal | None = None
        self._store: ISnapshotStore | None = None
        self._lock: DataDirLock | None = None
        self._threads: list[tuple[WriterThread, Any]] = []
        self._snapshot_runner: Runner | None = None
        self._writer_runner: Runner | None = None
        self._snapshot_lock = DeferredLock()
        #: Callers waiting for the snapshot after the one being written.
        self._snapshot_waiters: list[Deferred[int]] | None = None
        self._snapshot_loop: LoopingCall | None = None
        #: The replaying snapshot process at work, if any.
        self._snapshot_child: replayed._Report | None = None
        #: The code the snapshot process must find (see replayed.code_fingerprint).
        self._code = ""
        #: Set by stopService: snapshots from then on are of the live model.
        self._stopping = False
        self._loop_done: Deferred[Any] | None = None
        self.last_snapshot_seq = 0
        #: Seconds the reactor paused to start the last snapshot (the fork,
        #: or the serialization when not forking).
        self.last_snapshot_pause = 0.0
        #: Sequence number covered by the snapshot loaded at start-up (0: none).
        self.loaded_snapshot_seq = 0
        #: How many journal records start-up replayed.
        self.replayed = 0

    # -- helpers ------------------------------------------------------------------

    def _get_reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def model(self) -> M:
        """The live model. Read it; change it only through commands."""
        if self._engine is None:
            raise NotRunning("the journal service has not finished starting")
        return self._engine.model

    @property
    def engine(self) -> Engine[M]:
        if self._engine is None:
            raise NotRunning("the journal service has not finished starting")
        return self._engine

    # -- life cycle ---------------------------------------------------------------

    def startService(self) -> None:
        if self._engine is not None:
            # A second start would take the lock it already holds, fail, and
            # tear down the running journal on its way out; a start while a
            # stop is finishing would be torn down by that stop.
            raise RuntimeError(
                "the journal service is already running"
                if self.running
                else "the journal service is still stopping: start it again once the "
                "Deferred from stopService() has fired"
            )
        try:
            self._start()
        except BaseException:
            failure = Failure()
            self._release()
            self._readiness.failed(failure)
            raise
        Service.startService(self)
        self._readiness.succeeded()

    def _start(self) -> None:
        reactor = self._get_reactor()
        self._stopping = False
        if self.snapshot_app is not None:
            self._check_snapshot_app(reactor)
        if self.datadir is not None:
            if os.path.exists(self.datadir) and not os.path.isdir(self.datadir):
                raise UnsafeDataDir(f"data directory {self.datadir} is not a directory")
            os.makedirs(self.datadir, mode=DIR_MODE, exist_ok=True)
            check_private_dir(self.datadir)
            self._lock = DataDirLock(self.datadir)
            self._lock.acquire()
        journal = self._journal_given or FileJournal(
            os.path.join(self.datadir or "", "journal"),
            segment_size=self.segment_size,
            sync=self.sync,
            fs=self._fs,
        )
        store = self._snapshots_given or FileSnapshotStore(
            os.path.join(self.datadir or "", "snapshots"), fs=self._fs
        )
        self._journal, self._store = journal, store
        journal.open()
        model, snap_seq = self._load_snapshot(store)
        self.loaded_snapshot_seq = self.last_snapshot_seq = snap_seq
        newest = max(store.list(), default=0)
        last_time_ns = self._replay(journal, model, snap_seq, newest)
        if journal.next_seq <= newest:
            # A snapshot proves the model once reached ``newest``; starting
            # from less (say, an empty model) would silently lose history.
            raise RecoveryError(
                f"the journal in {journal.location} ends at sequence number "
                f"{journal.next_seq - 1} but snapshot {newest} in {store.location} covers "
                f"more{'' if newest == snap_seq else ' and cannot be loaded'}: records are "
                f"missing; see the warnings above and run 'python -m txjournal verify'"
            )
        if self.tune_gc:
            _gc_tuning.acquire(self.log)
            self._gc_frozen = True
        runner = self._runner_given
        if runner is None:
            runner = self._start_thread("txjournal-writer")
            self._snapshot_runner = self._start_thread("txjournal-snapshot")
        else:
            self._snapshot_runner = runner
        self._writer_runner = runner
        inline: dict[str, Any] = {}
        if self.inline_commit and isinstance(runner, WriterThread) and isinstance(journal, FileJournal):
            # Only a local file, only when nothing of the journal's runs on
            # the writer thread (see Engine, inline commit), and not while a
            # snapshot is being written: the disk is busy and syncs slow.
            writer, quick, snapshotting = runner, journal.append_is_quick, self._snapshot_lock
            inline = {
                "call_soon": lambda f: reactor.callLater(0, f),
                "inline_ready": lambda: writer.idle and not snapshotting.locked and quick(),
            }
        self._engine = Engine(
            self.schema, journal, model, runner, reactor.seconds,
            next_seq=journal.next_seq, last_time_ns=last_time_ns,
            max_pending=self.max_pending, **inline,
        )
        if self.snapshot_interval:
            loop = LoopingCall(self._scheduled_snapshot)
            loop.clock = reactor
            self._snapshot_loop = loop
            self._loop_done = loop.start(self.snapshot_interval, now=False)
        self.log.info(
            "Journal {schema} ready: snapshot at {snap}, {replayed} commands replayed, "
            "next sequence number {seq}; inline commit {inline}, garbage collector "
            "tuning {tuned}",
            schema=self.schema.name, snap=snap_seq, replayed=self.replayed,
            seq=journal.next_seq, inline="on" if inline else "off",
            tuned="on" if self._gc_frozen else "off",
        )

    def _start_thread(self, name: str) -> WriterThread:
        thread = WriterThread(self._get_reactor(), name)
        thread.start()
        # If the application never stops this service, the reactor's
        # shutdown still ends the thread cleanly.
        trigger = self._get_reactor().addSystemEventTrigger("during", "shutdown", thread.stop)
        self._threads.append((thread, trigger))
        return thread

    def _load_snapshot(self, store: ISnapshotStore) -> tuple[M, int]:
        return load_newest_snapshot(self.schema, store, self.serializer, self.log)

    def _replay(self, journal: IJournal, model: M, snap_seq: int, newest: int) -> int:
        from itertools import islice

        schema = self.schema
        journal_id = 0
        last_time_ns = 0
        count = 0
        started = last_report = time.monotonic()
        decode, is_retired, commands = schema.decode, schema.is_retired, schema.commands
        unpackb = fast_unpackb = msgpack.unpackb
        # Per name: its CommandType, or False if retired. A record of the
        # current version whose fields decode to a map is rebuilt here as
        # schema.decode() would (same class, same fields); anything else goes
        # through decode() itself, for upgrades and for its exact errors.
        known: dict[str, Any] = {}
        batches = getattr(journal, "replay_batches", None)
        if batches is not None:
            chunks = batches(snap_seq + 1, newest)
        else:
            records = iter(journal.replay(snap_seq + 1, newest))
            # Plain tuples, as replay_batches gives: apply_run takes no others.
            chunks = iter(lambda: [tuple(r) for r in islice(records, 1024)], [])
        # The common case goes through apply_run (in C where built); it stops
        # before anything else, which slow() below handles one record at a time.
        plan: Plan = {name: (ctype.cls, ctype.version) for name, ctype in commands.items()}
        log = self.log

        def slow(record: RecordTuple, journal_id: int) -> None:
            seq, time_ns, name, version, kind, user, fields = record
            if kind != KIND_COMMAND:
                if kind == KIND_QUERY:
                    return  # an audit record: nothing to apply
                # Written by a newer txjournal: its meaning is unknown here, and
                # skipping it could silently change history.
                raise RecoveryError(
                    f"record {seq} ({name!r}) has kind {kind}, unknown to this version of "
                    f"txjournal: upgrade txjournal to read this journal"
                )
            entry = known.get(name)
            if entry is None:
                if is_retired(name):
                    known[name] = False
                    return
                ctype = commands.get(name)
                if ctype is not None:
                    entry = known[name] = (ctype.cls, ctype.version)
            elif entry is False:
                return
            command: Any = None
            if entry is not None and version == entry[1]:
                try:
                    values = unpackb(fields, raw=False, strict_map_key=False)
                except Exception:
                    values = None
                if type(values) is dict:
                    try:
                        command = entry[0](**values)
                    except TypeError as e:
                        raise RecoveryError(
                            f"cannot replay record {seq} (command {name!r} version "
                            f"{version}): fields of command {name!r} do not fit: {e}"
                        ) from None
            if command is None:
                try:
                    command = decode(name, version, fields)
                except (UnknownCommand, InvalidArguments) as e:
                    raise RecoveryError(
                        f"cannot replay record {seq} (command {name!r} version {version}): {e}"
                    ) from None
            try:
                command.execute(model, Context(seq, time_ns, journal_id, user))
            except Exception as e:
                raised(seq, name, e)

        def raised(seq: int, name: str, error: Exception) -> None:
            # Part of history: the live run failed the same way.
            log.debug(
                "Replayed command {seq} ({name}) raised {error!r}, as it did live",
                seq=seq, name=name, error=error,
            )

        for batch in chunks:
            journal_id = journal.journal_id
            before = count
            count += len(batch)
            last_time_ns = batch[-1][1]
            i, n = 0, len(batch)
            while i < n:
                i, errors = apply_run(batch, i, plan, Context, journal_id, model, fast_unpackb)
                if errors:
                    for seq, name, error in errors:
                        raised(seq, name, error)
                if i < n:
                    slow(batch[i], journal_id)
                    i += 1
            if before // 8192 == count // 8192:
                continue
            # Reported as of the last multiple of 8192 records in this batch.
            reached = count // 8192 * 8192
            now = time.monotonic()
            if now - last_report >= _PROGRESS_EVERY:
                last_report = now
                rate = reached / (now - started)
                total = getattr(journal, "progress_total", 0)
                done = getattr(journal, "progress_done", 0)
                left = (now - started) * (total - done) / done if total and done else None
                self.log.info(
                    "Replaying: {count} records done, at {seq}, {rate:.0f}/s, "
                    "{percent}, about {left} left",
                    count=reached, seq=batch[reached - before - 1][0], rate=rate,
                    percent=f"{100 * done / total:.1f}%" if total else "?%",
                    left=f"{left:.0f}s" if left is not None else "unknown",
                )
        self.replayed = count
        # Records covered by the snapshot were read but not yielded: their time
        # still bounds the next record's, or logged times go backwards.
        return max(last_time_ns, journal.last_time_ns)

    def when_ready(self) -> Deferred[None]:
        """Fire once start-up replay has finished (errback if start-up failed)."""
        return self._readiness.wait()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        engine = self._engine
        if engine is None:
            self._release()
            return succeed(None)
        engine.close()
        self._stopping = True
        child = self._snapshot_child
        if child is not None:
            # The stop snapshot, of the live model that no longer changes,
            # supersedes it (or, without one, the last snapshot stands).
            self.log.info(
                "Stopping: ending snapshot process {pid}", pid=child.pid,
            )
            child.kill(replayed.STOPPING)
        elif self._snapshot_lock.locked:
            self.log.info("Stopping: waiting for the snapshot being written")
        d: Deferred[Any] = succeed(None)
        loop = self._snapshot_loop
        if loop is not None:
            if loop.running:
                loop.stop()
            if self._loop_done is not None:
                d.addCallback(lambda _: self._loop_done)
        d.addCallback(lambda _: engine.wait_idle())
        if self.snapshot_on_stop:
            d.addCallback(lambda _: self._snapshot_if_healthy())

        def snapshots_done(result: object) -> Deferred[object]:
            # Whatever happened above: let a snapshot in flight finish (its
            # process may be writing into the data directory, and its pruning
            # needs the threads) before the lock and the threads are let go.
            lock = self._snapshot_lock
            return lock.acquire().addCallback(lambda _: lock.release()).addCallback(lambda _: result)

        d.addBoth(snapshots_done)
        d.addErrback(lambda f: self.log.failure("Error while stopping the journal", f))
        d.addBoth(lambda _: self._release())
        return d

    def _snapshot_if_healthy(self) -> Deferred[Any] | None:
        engine = self._engine
        if engine is None or engine.failed is not None:
            return None
        return self._take_snapshot()

    def _release(self) -> None:
        for thread, trigger in self._threads:
            thread.stop()
            self._get_reactor().removeSystemEventTrigger(trigger)
        self._threads = []
        if self._journal is not None:
            self._journal.close()
        close_store = getattr(self._store, "close", None)
        if close_store is not None:  # SQL stores hold a connection
            close_store()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._engine = None
        if self._gc_frozen:
            self._gc_frozen = False
            _gc_tuning.release()

    # -- commands and queries -----------------------------------------------------

    def execute(self, command: Any, user: str | None = None) -> Deferred[Any]:
        """
        Journal, sync and apply ``command``.

        The Deferred fires with the command's return value once the command
        is durable and applied, or fails with the exception it raised (the
        command stays in the journal: replay fails it the same way).
        """
        if self._engine is None or not self.running:
            return fail(NotRunning("the journal service is not running"))
        return self._engine.execute(command, user)

    def execute_named(self, name: str, kwargs: dict[str, Any], user: str | None = None) -> Deferred[Any]:
        """Build the command ``name`` from plain arguments and execute it."""
        try:
            command = self.schema.build_command(name, kwargs)
        except Exception:
            return fail()
        return self.execute(command, user)

    def query(self, query: object, /, **kwargs: Any) -> Any:
        """
        Run a named query with ``kwargs``, or call ``query(model)``.

        If the query is audited, its audit record is written in the
        background: an in-process caller gets the value at once, and a
        crash may lose the record, as it would an unacknowledged command.
        Remote callers use :meth:`query_as`, which waits for the record.
        """
        model = self.model
        if callable(query):
            return query(model, **kwargs)
        if not isinstance(query, str):
            raise TypeError(f"query must be a registered name or a callable, not {query!r}")
        result, audited = self._run_query(query, kwargs, None)
        if audited is not None:
            audited.addErrback(
                lambda f: self.log.failure("Could not record query {name}", f, name=query)
            )
        return result

    def query_as(self, user: str | None, name: str, kwargs: dict[str, Any]) -> Deferred[Any]:
        """
        Run the named query for ``user``; if it is audited, the Deferred
        fires with the result only once the audit record is durable.
        """
        try:
            self.model  # noqa: B018 - raises NotRunning before start
            result, audited = self._run_query(name, kwargs, user)
        except Exception:
            return fail()
        if audited is None:
            return succeed(result)
        return audited.addCallback(lambda _: result)

    def _run_query(
        self, name: str, kwargs: dict[str, Any], user: str | None
    ) -> tuple[Any, Deferred[None] | None]:
        schema = self.schema
        qtype = schema.query_type(name)
        bound = schema.bind_query(name, kwargs)
        result = bound(self.model)  # a query that raises revealed nothing: not recorded
        audited = None
        if qtype.audit or self.audit_queries:
            try:
                arguments = msgpack.packb(dict(kwargs), use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as e:
                raise InvalidArguments(f"arguments of query {name!r} cannot be recorded: {e}") from None
            audited = self.engine.audit(qtype.name_bytes, arguments, user)
        return result, audited

    # -- snapshots ----------------------------------------------------------------

    def snapshot(self) -> Deferred[int]:
        """Write a snapshot now; Deferred of the sequence number it covers."""
        if self._engine is None or not self.running:
            return fail(NotRunning("the journal service is not running"))
        return self._take_snapshot()

    def _check_snapshot_app(self, reactor: Any) -> None:
        # Now, not at the first snapshot minutes later: a typo or a schema
        # the child would not find is a start-up error.
        from twisted.internet.interfaces import IReactorProcess
        from twisted.python.usage import UsageError

        from txjournal.tap import load_schema

        if not IReactorProcess.providedBy(reactor):
            raise ValueError("snapshot_app needs a reactor that can start processes")
        try:
            # Not the current directory: after twistd's --rundir it may hold
            # another copy, which the snapshot process would then import.
            schema = load_schema(self.snapshot_app or "", add_cwd=False)
        except UsageError as e:
            raise ValueError(f"snapshot_app: {e}") from None
        if schema is not self.schema:
            raise ValueError(
                f"snapshot_app {self.snapshot_app} is schema {schema.name!r}, not the "
                f"service's {self.schema.name!r} object"
            )
        self._code = replayed.code_fingerprint(self.snapshot_app or "", schema)

    def _use_fork(self, store: ISnapshotStore) -> bool:
        # Only where the child can write the snapshot on its own (a file
        # store) and a real thread waits for it (not a test's runner).
        return (
            self.snapshot_fork
            and forked.available()
            and isinstance(store, FileSnapshotStore)
            and self._runner_given is None
        )

    def _prune_journal(self, store: ISnapshotStore) -> Deferred[None]:
        journal, runner = self._journal, self._writer_runner
        kept = store.list()
        if journal is None or runner is None or not kept:
            return succeed(None)

        def pruned(paths: list[str]) -> None:
            if paths:
                self.log.info("Pruned journal segments covered by snapshot {seq}: {paths}", seq=kept[-1], paths=paths)

        def failed(f: Failure) -> None:
            self.log.failure("Pruning journal segments failed (nothing is lost)", f)

        # On the writer thread: segments are the writer's to change.
        return runner(journal.prune, kept[-1]).addCallbacks(pruned, failed)

    def _scheduled_snapshot(self) -> Deferred[Any] | None:
        # None after a write error (already logged as critical): the disk is
        # likely the cause, and retrying every interval would only add a
        # failure to the log each time. snapshot() still works.
        d = self._snapshot_if_healthy()
        if d is not None:
            # A failed snapshot must not stop the schedule; it was logged.
            d.addErrback(lambda _: None)
        return d

    def _take_snapshot(self) -> Deferred[int]:
        """
        A snapshot at least as new as this call: the one being written
        started earlier, so callers meanwhile share the next one. One
        running and one waiting, however many ask: queueing each on the
        lock would chain their releases deep enough to overflow the stack.
        """
        if not self._snapshot_lock.locked:
            return self._snapshot_lock.run(self._write_snapshot)
        waiter: Deferred[int] = Deferred()
        if self._snapshot_waiters is None:
            self._snapshot_waiters = []
            self._snapshot_lock.run(self._write_next_snapshot)
        self._snapshot_waiters.append(waiter)
        return waiter

    def _write_next_snapshot(self) -> Deferred[None]:
        waiters, self._snapshot_waiters = self._snapshot_waiters or [], None

        def share(result: int | Failure) -> None:
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        return self._write_snapshot().addBoth(share)

    def _write_snapshot(self, by_process: bool = True) -> Deferred[int]:
        engine, store = self._engine, self._store
        if engine is None or store is None:
            return fail(NotRunning("the journal service is not running"))
        seq = engine.applied_seq
        if seq == self.last_snapshot_seq:
            return succeed(seq)
        runner = self._snapshot_runner
        assert runner is not None
        keep = self.keep_snapshots
        if (
            by_process
            and not self._stopping
            and self.snapshot_app is not None
            and isinstance(store, FileSnapshotStore)
        ):
            return self._write_by_process(store, seq, runner)
        started = time.monotonic()
        if self._use_fork(store):
            try:
                pid, pipe = forked.start(engine.model, seq, self.serializer, self.schema, store)
            except OSError as e:
                self.log.failure("Snapshot at {seq} failed: cannot fork", seq=seq)
                return fail(SnapshotError(f"cannot fork the snapshot process: {e}"))
            how = f"forked child {pid}"
            killer = _PidKiller(pid)
            deadline = self._deadline(killer, close=killer.close)

            def write() -> tuple[str, int, list[int]]:
                try:
                    path, size = forked.wait(pid, pipe)
                except BaseException as e:
                    # A child killed mid-write (the OOM killer) leaves its temp file.
                    if isinstance(store, FileSnapshotStore):
                        self._discard_temp(store, seq)
                    if deadline.fired:
                        raise SnapshotError(
                            f"the snapshot child process {pid} was killed: it did not "
                            f"finish within {self.snapshot_timeout:g} s"
                        ) from e
                    raise
                return path, size, store.prune(keep)

        else:
            try:
                payload = self.serializer.dumps(engine.model)
                digest = self.schema.model_digest(engine.model, payload)
            except Exception as e:
                self.log.failure("Snapshot at {seq} failed: model cannot be serialized", seq=seq)
                return fail(SnapshotError(f"model cannot be serialized: {e}"))
            how = "serialized on the reactor thread"
            deadline = _Deadline(None)

            def write() -> tuple[str, int, list[int]]:
                path = store.save(seq, payload, digest)
                return path, len(payload), store.prune(keep)

        stall = self.last_snapshot_pause = time.monotonic() - started
        d = runner(write)
        d.addBoth(deadline.settled)
        return d.addCallbacks(
            self._snapshot_saved(store, seq, how, stall), self._snapshot_failed(seq)
        )

    def _discard_temp(self, store: FileSnapshotStore, seq: int) -> None:
        # Never in the way of the error that brought us here.
        try:
            store.discard_temp(seq)
        except OSError as e:
            self.log.warn(
                "Cannot remove the temp file of snapshot {seq} in {store}: {error}",
                seq=seq, store=store.location, error=e,
            )

    def _deadline(
        self, kill: Callable[[], object], close: Callable[[], object] | None = None
    ) -> _Deadline:
        timeout = self.snapshot_timeout
        deadline = _Deadline(None)
        deadline.closing = close
        if not timeout:
            return deadline

        def expire() -> None:
            deadline.fired = True
            try:
                kill()
            except ProcessLookupError:
                pass

        deadline.call = self._get_reactor().callLater(timeout, expire)
        return deadline

    def _write_by_process(
        self, store: FileSnapshotStore, seq: int, runner: Runner
    ) -> Deferred[int]:
        assert self.datadir is not None and self.snapshot_app is not None
        started = time.monotonic()
        try:
            child = replayed.spawn(
                self._get_reactor(), self.snapshot_app, self.schema.name, self.datadir, seq,
                self._code,
            )
        except Exception as e:
            self.log.failure("Snapshot at {seq} failed: cannot start its process", seq=seq)
            return fail(SnapshotError(f"cannot start the snapshot process: {e}"))
        stall = self.last_snapshot_pause = time.monotonic() - started
        how = f"replayed by process {child.pid}"
        keep = self.keep_snapshots
        deadline = self._deadline(
            lambda: child.kill(f"it did not finish within {self.snapshot_timeout:g} s")
        )

        self._snapshot_child = child

        def gone(result: _T) -> _T:
            self._snapshot_child = None
            return result

        def prune(written: replayed.Written) -> Deferred[tuple[str, int, list[int]]]:
            for skipped, why in written.skipped:
                # Start-up would say so too, but only at the next restart.
                self.log.warn(
                    "Snapshot {skipped} in {store} cannot be loaded ({why}); snapshot "
                    "{seq} was replayed from an older one", skipped=skipped,
                    store=store.location, why=why, seq=seq,
                )
            return runner(lambda: (written.path, written.size, store.prune(keep)))

        def unsaved(f: Failure) -> Failure | Deferred[int]:
            self._discard_temp(store, seq)  # a process killed mid-write leaves its temp file
            if child.killed_because == replayed.STOPPING:
                # Ended by stopService on purpose: nothing to alarm anyone with.
                return Failure(SnapshotError(f"snapshot at {seq} not written: {f.value}"))
            engine = self._engine
            error = f.value
            if (
                isinstance(error, replayed.ProcessFailed)
                and error.stage == "load"
                and engine is not None
                and engine.failed is None
            ):
                # It ran and said what stopped it before writing (the
                # application no longer imports or changed on disk, the
                # journal it needed was pruned past a damaged snapshot):
                # the live model is still there to snapshot.
                self.log.warn(
                    "Snapshot at {seq}: {error}; writing a snapshot of the live model "
                    "(now at {now}) instead", seq=seq, error=str(error),
                    now=engine.applied_seq,
                )
                return self._write_snapshot(by_process=False)
            return self._snapshot_failed(seq)(f)

        done: Deferred[Any] = child.done
        done.addBoth(deadline.settled)
        done.addBoth(gone)
        done.addCallback(prune)
        return done.addCallbacks(self._snapshot_saved(store, seq, how, stall), unsaved)

    def _snapshot_saved(
        self, store: ISnapshotStore, seq: int, how: str, stall: float
    ) -> Callable[[tuple[str, int, list[int]]], int | Deferred[int]]:
        def saved(result: tuple[str, int, list[int]]) -> int | Deferred[int]:
            path, size, removed = result
            self.last_snapshot_seq = seq
            self.log.info(
                "Snapshot {path} written: {size} bytes covering {seq} ({how}; the reactor "
                "paused {stall:.4f}s; removed {removed})",
                path=path, size=size, seq=seq, how=how, stall=stall, removed=removed,
            )
            if self.prune_segments:
                return self._prune_journal(store).addCallback(lambda _: seq)
            return seq

        return saved

    def _snapshot_failed(self, seq: int) -> Callable[[Failure], Failure]:
        def failed(f: Failure) -> Failure:
            self.log.failure("Snapshot at {seq} failed; older snapshots are still usable", f, seq=seq)
            return Failure(SnapshotError(f"writing the snapshot at {seq} failed: {f.value}"))

        return failed


class _Deadline:
    """A snapshot process's time limit: the call that kills it, and whether it did."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.fired = False
        self.closing: Callable[[], object] | None = None

    def settled(self, result: _T) -> _T:
        if self.call is not None and self.call.active():
            self.call.cancel()
        if self.closing is not None:
            self.closing()
            self.closing = None
        return result


class _PidKiller:
    """
    Kills a forked child by a pidfd where there is one: the snapshot thread
    reaps the child, and a kill by pid racing that could reach another
    process that got the pid since.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass

    def __call__(self) -> None:
        if self.pidfd is None:
            os.kill(self.pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


#: The first generation's collection threshold set by ``tune_gc``.
GC_THRESHOLD0 = 50_000


class _GCTuning:
    """
    The collector's settings are process-wide, so ``tune_gc`` is counted
    across the services of a process: the first to start saves the
    threshold, each one freezes what it loaded, and only the last to stop
    unfreezes and puts the threshold back. Without the count, one service
    stopping would thaw another's model, and the raised threshold would
    outlive every service.
    """

    def __init__(self) -> None:
        self.users = 0
        self.saved: tuple[int, int, int] | None = None
        self.ours: tuple[int, int, int] | None = None
        # Set when objects frozen earlier were handed back: garbage cycles
        # among them (a stopped service's model) sit in the oldest
        # generation, and freezing again without a full pass would keep
        # them for good.
        self.thawed = False

    def acquire(self, log: Logger) -> None:
        started = time.monotonic()
        if self.thawed:
            # Running services' models are thawed for this one pass too:
            # what a lone restart pays anyway.
            gc.unfreeze()
            gc.collect()
            self.thawed = False
        else:
            # The young generations only: replay's garbage is there, and a
            # full pass would walk the whole heap (the model included).
            gc.collect(1)
        gc.freeze()
        if self.users == 0:
            self.saved = gc.get_threshold()
            threshold0, threshold1, threshold2 = self.saved
            if 0 < threshold0 < GC_THRESHOLD0:
                gc.set_threshold(GC_THRESHOLD0, threshold1, threshold2)
            self.ours = gc.get_threshold()
        self.users += 1
        # (Not gc.get_freeze_count(): it walks every frozen object.)
        log.info(
            "Garbage collector tuned for a long-lived model: objects alive frozen in "
            "{took:.3f}s, first-generation threshold {threshold}",
            took=time.monotonic() - started, threshold=gc.get_threshold()[0],
        )

    def release(self) -> None:
        if self.users <= 0:
            return
        self.users -= 1
        # The stopped service's model is among the frozen objects: the next
        # start, while others run, must thaw and collect before it freezes.
        self.thawed = True
        if self.users > 0:
            return
        # What was frozen is the collector's again: cycles among it that
        # became garbage are reclaimed by the next full pass.
        gc.unfreeze()
        # The threshold goes back unless someone else has changed it since.
        if self.saved is not None and gc.get_threshold() == self.ours:
            gc.set_threshold(*self.saved)
        self.saved = self.ours = None


_gc_tuning = _GCTuning()


def load_newest_snapshot(
    schema: Schema[M], store: ISnapshotStore | None, serializer: ISnapshotSerializer, log: Logger
) -> tuple[M, int]:
    """
    The model of the newest snapshot that loads, and the sequence number it
    covers; a fresh model and 0 if none does. Each one skipped is logged
    with its location and the reason (a renamed class, a bad checksum).
    """
    if store is None:
        return schema.new_model(), 0
    for seq in store.list():
        try:
            model = serializer.loads(store.load(seq))
        except Exception as e:
            log.warn(
                "Skipping snapshot {seq} in {location}: {reason}; trying an older one",
                seq=seq, location=store.location, reason=f"{type(e).__name__}: {e}",
            )
            continue
        log.info("Loaded snapshot covering sequence number {seq}", seq=seq)
        return model, seq  # type: ignore[return-value]
    return schema.new_model(), 0
