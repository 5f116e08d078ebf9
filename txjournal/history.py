"""
Commands across time: replay a data directory's journal with the current code.

The journal keeps the whole history of a model (unless segments were
pruned), which makes three questions answerable without a running service:

* :func:`check` -- does the *current* code still produce the models the
  snapshots recorded? It replays the journal from sequence number 1 into a
  fresh model and, at each snapshot's sequence number, compares
  :meth:`Schema.model_digest <txjournal.schema.Schema.model_digest>` with
  the digest stored in the snapshot. A difference means a command's code
  changed behaviour for history that already happened: the model a
  restart from scratch would build is no longer the one that was served.
* :func:`rebuild` -- make the current code's model the real one: replay
  everything from scratch and write a new snapshot, moving the old
  snapshots aside first (they were built by older code, and start-up would
  otherwise prefer the newest of them).
* :func:`replay_to` -- the model as of a sequence number or a moment in
  the past, in memory, to query, explore or benchmark.

Everything here reads the journal with a read-only
:class:`~txjournal.journal.file.FileJournal`; only :func:`rebuild` writes,
and only after taking ``DATADIR/LOCK`` so that it cannot race a running
service. :func:`check` and :func:`replay_to` also read an SQL journal
named by URL (``sqlite:///path.db``, ``postgresql://user@host/db``), and
a snapshot store named by ``snapshots`` (see
:func:`txjournal.tools.open_snapshots`), both read-only: no table is
created, and a PostgreSQL journal is never taken over (its running writer
is not fenced). An SQL journal has no snapshots unless one is named.
:func:`rebuild` refuses URLs: it writes, and only a data directory's
``LOCK`` keeps a running service out of the way.

Replay follows start-up's rules exactly: a command that raises is
part of history (counted, not fatal), retired command names are skipped
on purpose, records that are not commands (query audit records) are
skipped, and a record that the code cannot decode (unknown name, version
without upgrade, fields that do not fit) stops everything with
:class:`UnreplayableRecord`, since skipping it would silently rewrite
history.

Functions return dataclasses and print nothing; progress is reported
through a ``progress(done, total)`` callback (see
:mod:`txjournal.progress`), and :mod:`txjournal.history_cli` does the
talking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from txjournal import record as rec
from txjournal import urls
from txjournal.errors import InvalidArguments, SnapshotError, UnknownCommand
from txjournal.fs import OSFileSystem, check_private_dir
from txjournal.interfaces import IFileSystem, ISnapshotSerializer
from txjournal.journal.file import FileJournal
from txjournal.journal.readonly import ReadOnlySQLJournal
from txjournal.lock import DataDirLock
from txjournal.schema import Context, Schema
from txjournal.snapshot.file import FileSnapshotStore
from txjournal.snapshot.serializer import PickleSerializer
from txjournal.tools import (
    DEFAULT_TABLE_PREFIX,
    MovedFile,
    NeedsDataDir,
    NotADataDir,
    ToolError,
    ToolJournal,
    ToolSnapshots,
    close_snapshots,
    iso_ns,
    open_snapshots,
    open_sql_journal,
    snapshot_digests,
    snapshot_location,
    snapshots_location,
    source_name,
    unique_path,
)

#: ``progress(records done, records expected or None)``.
ProgressCallback = Callable[[int, int | None], None]

#: Records between two progress calls: often enough for a smooth bar, rarely
#: enough that the call costs nothing next to replaying the records.
PROGRESS_EVERY = 2048

#: Name prefix of the directory :func:`rebuild` moves old snapshots into.
REBUILD_BACKUP_PREFIX = "snapshots-before-rebuild-"

_LENGTH = struct.Struct("<I")


class HistoryError(ToolError):
    """The history cannot be replayed as asked; the message says why. Nothing was changed."""


class UnreplayableRecord(HistoryError):
    """
    A journal record that the current code cannot turn into a command: an
    unknown (and not retired) name, a version newer than the code or without
    an upgrade, or fields that do not fit the class.

    Replay stops here: skipping the record would silently change history.
    Register the command again, add an upgrade, or, if dropping it is the
    intent, declare the name with :meth:`Schema.retire
    <txjournal.schema.Schema.retire>`.
    """

    def __init__(self, seq: int, name: str, version: int, reason: str) -> None:
        self.seq = seq
        self.name = name
        self.version = version
        self.reason = reason
        super().__init__(
            f"cannot replay record {seq}: command {name!r} version {version}: {reason}"
        )


# -- replay statistics --------------------------------------------------------------


@dataclass
class CommandTiming:
    """Replay cost of one command name: decoding plus executing, wall-clock."""

    name: str
    count: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float | None:
        return self.count / self.seconds if self.seconds > 0 else None

    @property
    def microseconds(self) -> float | None:
        """Mean microseconds per command."""
        return self.seconds * 1e6 / self.count if self.count else None


@dataclass(frozen=True)
class ReplayStats:
    """
    What a replay went through.

    ``commands`` counts executed commands, including the ``failed`` ones
    (they raised live too: part of history). ``retired`` and ``other``
    count records skipped on purpose: retired command names and records
    that are not commands (query audit records). ``seconds`` is the wall
    time of the whole replay, reading included. ``timings`` (per command
    name) is filled only when timing was asked for, because measuring each
    command costs time of its own.
    """

    records: int
    commands: int
    failed: int
    retired: int
    other: int
    seconds: float
    timings: dict[str, CommandTiming] = field(default_factory=dict)

    @property
    def per_second(self) -> float | None:
        """Commands per second over the whole replay."""
        return self.commands / self.seconds if self.seconds > 0 else None


class _Replayer:
    """Applies records to a model as start-up does, and counts what it did."""

    def __init__(
        self,
        schema: Schema[Any],
        model: Any,
        timing: bool = False,
        progress: ProgressCallback | None = None,
        total: int | None = None,
    ) -> None:
        self.schema = schema
        self.model = model
        self.timing = timing
        self.progress = progress
        self.total = total
        self.records = self.commands = self.failed = self.retired = self.other = 0
        self.timings: dict[str, CommandTiming] = {}
        self.last_seq = 0
        self.last_time_ns: int | None = None
        self._started = time.perf_counter()

    def apply(self, record: rec.Record, journal_id: int) -> None:
        self.records += 1
        self.last_seq = record.seq
        self.last_time_ns = record.time_ns
        if self.progress is not None and self.records % PROGRESS_EVERY == 0:
            self.progress(self.records, self.total)
        if record.kind != rec.KIND_COMMAND:
            if record.kind != rec.KIND_QUERY:
                raise UnreplayableRecord(
                    record.seq, record.name, record.version,
                    f"its kind {record.kind} is unknown to this version of txjournal",
                )
            self.other += 1
            return
        schema = self.schema
        if schema.is_retired(record.name):
            self.retired += 1
            return
        started = time.perf_counter() if self.timing else 0.0
        try:
            command: Any = schema.decode(record.name, record.version, record.fields)
        except (UnknownCommand, InvalidArguments) as e:
            raise UnreplayableRecord(record.seq, record.name, record.version, str(e)) from None
        failed = False
        try:
            command.execute(self.model, Context(record.seq, record.time_ns, journal_id, record.user))
        except Exception:
            # Part of history: the live run raised the same way.
            failed = True
            self.failed += 1
        self.commands += 1
        if self.timing:
            elapsed = time.perf_counter() - started
            timing = self.timings.get(record.name)
            if timing is None:
                timing = self.timings[record.name] = CommandTiming(record.name)
            timing.count += 1
            timing.seconds += elapsed
            timing.failed += failed

    def stats(self) -> ReplayStats:
        if self.progress is not None:
            self.progress(self.records, self.total if self.total is not None else self.records)
        return ReplayStats(
            self.records, self.commands, self.failed, self.retired, self.other,
            time.perf_counter() - self._started, dict(self.timings),
        )


# -- reading a data directory -------------------------------------------------------


def _check_datadir(datadir: str) -> str:
    path = os.path.abspath(datadir)
    if not os.path.isdir(path):
        raise NotADataDir(f"{path} is not a directory")
    return path


def _open_journal(datadir: str) -> FileJournal:
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    return journal


@dataclass
class _Source:
    """A journal and its snapshot store (if any), opened read-only for a replay."""

    name: str
    journal: ToolJournal
    store: ToolSnapshots | None

    def close(self) -> None:
        try:
            if isinstance(self.journal, ReadOnlySQLJournal):
                self.journal.close()
        finally:
            close_snapshots(self.store)


@contextlib.contextmanager
def _opened(source: str, snapshots: str | None, table_prefix: str) -> Iterator[_Source]:
    """
    A data directory's or an SQL journal's :class:`_Source`; an SQL
    journal is read in one read-only transaction (one moment of it).
    """
    if urls.is_url(source):
        journal: ToolJournal = open_sql_journal(source, table_prefix)
        datadir = None
    else:
        datadir = _check_datadir(source)
        journal = _open_journal(datadir)
    opened = _Source(datadir or source_name(source), journal, None)
    try:
        opened.store = open_snapshots(snapshots, datadir, table_prefix)
        if isinstance(journal, ReadOnlySQLJournal):
            with journal.consistent():
                yield opened
        else:
            yield opened
    finally:
        opened.close()


def _snapshots(datadir: str, readonly: bool = True) -> FileSnapshotStore:
    return FileSnapshotStore(os.path.join(datadir, "snapshots"), readonly=readonly)


def estimate_last_seq(journal: ToolJournal) -> int | None:
    """
    The journal's last sequence number, cheaply, for progress totals.

    An SQL journal simply says (``max(seq)``); for files:

    Only the last segment is read, walking its length prefixes without
    checking checksums (the replay that follows checks everything), so
    this costs one read of at most one segment. ``None`` for an empty
    journal. A torn tail may make it one or two records too high; it is an
    estimate, never used for anything but progress.
    """
    if isinstance(journal, ReadOnlySQLJournal):
        return journal.last_seq()
    if not journal.segments:
        return None
    first, path = journal.segments[-1]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    offset = rec.SEGMENT_HEADER_SIZE
    end = len(data)
    count = 0
    while offset + rec.PREFIX_SIZE <= end:
        (length,) = _LENGTH.unpack_from(data, offset)
        if length < rec.BODY_HEAD_SIZE or offset + rec.PREFIX_SIZE + length > end:
            break
        offset += rec.PREFIX_SIZE + length
        count += 1
    return first + count - 1


def _require_full_history(journal: ToolJournal, what: str) -> None:
    first = journal.first_seq()
    if first is not None and first > 1:
        pruned = "segments" if isinstance(journal, FileJournal) else "rows"
        raise HistoryError(
            f"the journal in {journal.location} starts at sequence number {first} "
            f"(older {pruned} were pruned): {what} needs the whole history from 1"
        )


def _journal_id(journal: ToolJournal) -> int:
    # Valid once the first segment's header has been read, which happens
    # before the first record is yielded.
    return journal.journal_id


# -- check --------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotCheck:
    """
    One snapshot compared with the replayed model.

    ``matches`` is ``None`` when no comparison was possible; ``note`` says
    why (the snapshot's digest cannot be read, or it covers records the
    journal does not hold). Digests are hex strings.
    """

    seq: int
    path: str
    matches: bool | None
    stored: str | None = None
    computed: str | None = None
    note: str = ""


@dataclass(frozen=True)
class CheckReport:
    """
    What :func:`check` found. ``snapshots`` is in sequence order and ends at
    the first divergence: once the models differ, later comparisons only
    repeat it, and replaying further would cost time for nothing.
    """

    datadir: str
    snapshots: list[SnapshotCheck]
    #: Snapshots that exist (compared or not).
    total_snapshots: int
    #: Last sequence number replayed.
    last_seq: int
    stats: ReplayStats
    #: Where the snapshots compared are; ``None``: no store (an SQL journal without ``snapshots``).
    snapshot_store: str | None = None

    @property
    def divergence(self) -> SnapshotCheck | None:
        """The first snapshot whose digest differs, if any."""
        return next((s for s in self.snapshots if s.matches is False), None)

    @property
    def unchecked(self) -> list[SnapshotCheck]:
        return [s for s in self.snapshots if s.matches is None]

    @property
    def matched(self) -> int:
        return sum(1 for s in self.snapshots if s.matches)

    @property
    def ok(self) -> bool:
        """Every snapshot was compared and matched (vacuously true without snapshots)."""
        return self.matched == self.total_snapshots

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["divergence"] = None if self.divergence is None else dataclasses.asdict(self.divergence)
        return data


def check(
    schema: Schema[Any],
    datadir: str,
    progress: ProgressCallback | None = None,
    serializer: ISnapshotSerializer | None = None,
    *,
    snapshots: str | None = None,
    table_prefix: str = DEFAULT_TABLE_PREFIX,
) -> CheckReport:
    """
    Replay the whole journal with the current code and compare the model
    with every snapshot's stored digest, in sequence order, until the first
    difference. Reads only; the data directory may be in use.

    The digest is :meth:`Schema.model_digest
    <txjournal.schema.Schema.model_digest>`: with a schema ``digest``
    function the comparison is of what that function says matters; without
    one, of the serialized model (pickled, or by ``serializer``: pass the
    service's own if it has one), which differs for models that serialize
    differently although equal (sets of strings across processes, for
    instance): give such a schema a ``digest`` function.

    ``datadir`` may be an SQL journal's URL, and ``snapshots`` names the
    store to compare with instead of ``DATADIR/snapshots`` (for an SQL
    journal there is none unless named; see the module docstring).

    :raises NotADataDir: ``datadir`` is not a directory (or, as
        :class:`~txjournal.tools.BadSource`, a URL that names no journal).
    :raises HistoryError: the journal was pruned (there is no history from 1).
    :raises UnreplayableRecord: a record the code cannot decode.
    :raises txjournal.errors.JournalCorrupt: damage in the journal.
    """
    with _opened(datadir, snapshots, table_prefix) as source:
        return _check(schema, source, progress, serializer)


def _check(
    schema: Schema[Any],
    source: _Source,
    progress: ProgressCallback | None,
    serializer: ISnapshotSerializer | None,
) -> CheckReport:
    journal, store = source.journal, source.store
    _require_full_history(journal, "checking snapshots against a replay")
    seqs = sorted(store.list()) if store is not None else []
    stored: dict[int, bytes | str] = {}
    #: Snapshots whose model digest is their payload's SHA-256: written
    #: without a schema digest function (older code, or version 1 files).
    pickle_digested: set[int] = set()
    for seq in seqs:
        assert store is not None
        try:
            model_digest, payload_digest = snapshot_digests(store, seq)
        except (SnapshotError, OSError) as e:
            stored[seq] = str(e)  # a reason, not a digest
            continue
        stored[seq] = model_digest
        if model_digest == payload_digest:
            pickle_digested.add(seq)
    results: list[SnapshotCheck] = []
    replayer = _Replayer(
        schema, schema.new_model(), progress=progress, total=estimate_last_seq(journal)
    )
    pending = list(seqs)

    def compare(seq: int) -> bool:
        """Compare snapshot ``seq`` with the model now; whether to go on."""
        assert store is not None
        reference = stored[seq]
        path = snapshot_location(store, seq)
        if isinstance(reference, str):
            results.append(SnapshotCheck(seq, path, None, note=reference))
            return True
        model = replayer.model
        payload = None
        if serializer is not None and (schema.digest is None or seq in pickle_digested):
            payload = serializer.dumps(model)
        if seq in pickle_digested and schema.digest is not None:
            # Compare like with like: this snapshot predates the digest function.
            computed = Schema(schema.name, schema.model_factory).model_digest(model, payload)
        else:
            computed = schema.model_digest(model, payload)
        matches = computed == reference
        results.append(SnapshotCheck(seq, path, matches, reference.hex(), computed.hex()))
        return matches

    diverged = False
    # A snapshot at 0 (the empty model) is compared before anything is applied.
    while pending and pending[0] <= 0 and not diverged:
        diverged = not compare(pending.pop(0))
    if not diverged:
        # On to the end even after the last snapshot: that the current code
        # can replay every record (no unknown command) is worth knowing too.
        for record in journal.replay(1):
            replayer.apply(record, _journal_id(journal))
            while pending and pending[0] == record.seq:
                if not compare(pending.pop(0)):
                    diverged = True
                    break
            if diverged:
                break
    if not diverged:
        for seq in pending:
            assert store is not None
            results.append(SnapshotCheck(
                seq, snapshot_location(store, seq), None,
                note=f"covers sequence number {seq} but the journal ends at "
                f"{replayer.last_seq}: records are missing",
            ))
    return CheckReport(
        source.name, results, len(seqs), replayer.last_seq, replayer.stats(),
        None if store is None else snapshots_location(store),
    )


# -- rebuild ------------------------------------------------------------------------


@dataclass(frozen=True)
class RebuildReport:
    """
    What :func:`rebuild` did: the new snapshot (covering ``seq``), and where
    the old snapshots went (``backup_dir`` is ``None`` when there were none).
    ``torn_tail`` is set when the journal ends in a torn write, which the
    rebuild left alone (start-up cuts it off; those commands were never
    acknowledged).
    """

    datadir: str
    seq: int
    snapshot: str
    size: int
    digest: str
    moved: list[MovedFile]
    backup_dir: str | None
    stats: ReplayStats
    torn_tail: str | None = None


#: Why :func:`rebuild` refuses an SQL journal, and what to do instead.
REBUILD_SQL = (
    "rebuild works on a data directory, whose LOCK keeps the service out while it "
    "replaces the snapshots; {source} is a database, which has no such lock. Compare "
    "the current code with the snapshots first ('python -m txjournal check {source} "
    "--snapshots STORE --app ...'); then stop the service, move its snapshots aside (or "
    "give it an empty snapshot store) and start it: start-up replays the whole journal "
    "with the current code, and the snapshot it takes on stop (or the next scheduled one) "
    "holds the rebuilt model"
)


def rebuild(
    schema: Schema[Any],
    datadir: str,
    progress: ProgressCallback | None = None,
    serializer: ISnapshotSerializer | None = None,
    fs: IFileSystem | None = None,
) -> RebuildReport:
    """
    Replay the whole journal into a fresh model with the current code and
    make that model the one start-up loads: move every existing snapshot
    into ``DATADIR/snapshots-before-rebuild-<UTC time>/``, then write a new
    snapshot covering the journal's last record.

    The order matters. Everything that can fail on the history's account
    (an unreplayable record, damage, a pruned journal, a snapshot beyond
    the journal's end) fails during the replay, before anything changes.
    The old snapshots move before the new one is written because the new
    one may have the same name (a clean shutdown snapshots the last record
    too); should writing it fail, the snapshot directory is merely empty,
    and start-up replays the whole (intact) journal: nothing is lost.

    Takes ``DATADIR/LOCK`` for the whole operation, so it refuses while the
    service runs (which would otherwise keep writing snapshots of the old
    model, and whose next snapshot would hide the rebuilt one).

    :raises txjournal.errors.DataDirLocked: the service (or another tool) runs.
    :raises HistoryError: the journal is empty or pruned, or a snapshot
        covers records the journal does not hold.
    :raises UnreplayableRecord: a record the code cannot decode.
    :raises NeedsDataDir: ``datadir`` is a journal URL (see :data:`REBUILD_SQL`).
    """
    if urls.is_url(datadir):
        raise NeedsDataDir(REBUILD_SQL.format(source=source_name(datadir)))
    datadir = _check_datadir(datadir)
    check_private_dir(datadir)
    fs = fs if fs is not None else OSFileSystem()
    serializer = serializer if serializer is not None else PickleSerializer()
    lock = DataDirLock(datadir)
    lock.acquire()
    try:
        journal = _open_journal(datadir)
        if not journal.segments:
            raise HistoryError(f"the journal in {journal.location} is empty: nothing to rebuild")
        _require_full_history(journal, "rebuilding the model")
        replayer = _Replayer(
            schema, schema.new_model(), progress=progress, total=estimate_last_seq(journal)
        )
        for record in journal.replay(1):
            replayer.apply(record, _journal_id(journal))
        stats = replayer.stats()
        seq = replayer.last_seq
        if seq == 0:
            raise HistoryError(f"the journal in {journal.location} holds no records: nothing to rebuild")
        snapdir = os.path.join(datadir, "snapshots")
        old = sorted(_snapshots(datadir).list())
        beyond = [s for s in old if s > seq]
        if beyond:
            raise HistoryError(
                f"snapshot {beyond[-1]} covers more than the journal, which ends at {seq}: "
                f"records are missing, and rebuilding would lose them; run "
                f"'python -m txjournal verify {datadir}'"
            )
        payload = serializer.dumps(replayer.model)
        digest = schema.model_digest(replayer.model, payload)
        moved: list[MovedFile] = []
        backup = None
        if old:
            backup = _backup_path(datadir)
            fs.makedirs(backup)
            fs.fsync_dir(datadir)
            store = _snapshots(datadir)
            for s in old:
                path = store.path(s)
                target = os.path.join(backup, os.path.basename(path))
                moved.append(MovedFile(path, _size(path), target))
                fs.rename(path, target)
            fs.fsync_dir(backup)
            fs.fsync_dir(snapdir)
        store = FileSnapshotStore(snapdir, fs=fs)
        path = store.save(seq, payload, digest)
        torn = None
        if journal.torn_tail is not None:
            tpath, offset, reason = journal.torn_tail
            torn = f"{tpath} at offset {offset}: {reason}"
        return RebuildReport(
            datadir, seq, path, len(payload), digest.hex(), moved, backup, stats, torn
        )
    finally:
        lock.release()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _backup_path(datadir: str) -> str:
    """A fresh ``DATADIR/snapshots-before-rebuild-<UTC time>`` (the lock is held: no race)."""
    return unique_path(datadir, REBUILD_BACKUP_PREFIX)


# -- replay to a point in time ------------------------------------------------------


def parse_time(text: str) -> int:
    """
    The last nanosecond an ISO 8601 time names, as ns since the epoch.

    A time without a zone is UTC, as ``inspect`` prints them. ISO 8601 here
    has microsecond resolution, and ``inspect`` shows logged times cut to
    the microsecond, so a time stands for its whole microsecond: pasting a
    record's time from ``inspect`` includes that record.

    :raises ValueError: not an ISO 8601 time.
    """
    try:
        return iso_ns(text) + 999
    except ValueError:
        raise ValueError(
            f"{text.strip()!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)"
        ) from None


@dataclass(frozen=True)
class PointInTime:
    """
    The model as of a point in history, built by :func:`replay_to`.

    ``seq`` is the last record the model includes (0: the empty model) and
    ``time_ns`` that record's logged time (``None`` when the journal no
    longer holds it, or for the empty model). ``snapshot`` is the snapshot it
    started from (0: from scratch); ``skipped_snapshots`` those tried and
    not used, with the reason. ``journal_end`` is true when the journal
    ended before the point asked for: the model is the latest there is.
    """

    model: Any
    seq: int
    time_ns: int | None
    snapshot: int
    journal_end: bool
    stats: ReplayStats
    skipped_snapshots: list[tuple[int, str]] = field(default_factory=list)


def _first_record_from(journal: ToolJournal, seq: int) -> rec.Record | None:
    """The first record at or after ``seq``; reads only the segment holding it."""
    first = journal.first_seq()
    if first is None:
        return None
    return next(iter(journal.replay(max(seq, first))), None)


def _snapshot_before(
    journal: ToolJournal, snap: int, until_time_ns: int | None
) -> str | None:
    """
    Why snapshot ``snap`` cannot start a replay that must stop at
    ``until_time_ns`` (or continue from the journal), or ``None`` if it can.
    """
    first = journal.first_seq()
    if first is not None and first > snap + 1:
        return f"the journal starts at {first}, after the snapshot's {snap} + 1"
    if until_time_ns is None:
        return None
    record = _first_record_from(journal, snap)
    if record is None:
        return f"the journal does not reach {snap}, so its time is unknown"
    # Logged times never decrease: if the snapshot's record (or, when that one
    # was pruned, the next one) is not later than the point, neither is any
    # record the snapshot covers.
    if record.seq > snap + 1 or record.time_ns > until_time_ns:
        return "it covers records logged after that time"
    return None


def replay_to(
    schema: Schema[Any],
    datadir: str,
    until_seq: int | None = None,
    until_time_ns: int | None = None,
    use_snapshots: bool = True,
    timing: bool = False,
    progress: ProgressCallback | None = None,
    serializer: ISnapshotSerializer | None = None,
    *,
    snapshots: str | None = None,
    table_prefix: str = DEFAULT_TABLE_PREFIX,
) -> PointInTime:
    """
    Build the model as of ``until_seq`` (the last record included) and/or
    ``until_time_ns`` (records logged at or before it; logged times never
    decrease along a journal, so the first later record ends the replay),
    or as of the journal's end when neither is given. In memory only:
    nothing in ``datadir`` is written, and it may be in use.

    With ``use_snapshots`` the newest snapshot at or before the point that
    loads is the starting point (snapshots are pickles: the application's
    code must be importable, which it is when ``schema`` was); otherwise,
    and when none fits, the replay starts from an empty model at 1.
    ``timing`` measures every command (see :attr:`ReplayStats.timings`).

    ``datadir`` may be an SQL journal's URL, and ``snapshots`` names the
    store to start from instead of ``DATADIR/snapshots`` (for an SQL
    journal there is none unless named: the replay starts from 1).

    :raises NotADataDir: ``datadir`` is not a directory (or, as
        :class:`~txjournal.tools.BadSource`, a URL that names no journal).
    :raises HistoryError: the journal was pruned and no snapshot bridges the gap.
    :raises UnreplayableRecord: a record the code cannot decode.
    :raises txjournal.errors.JournalCorrupt: damage before the point.
    """
    serializer = serializer if serializer is not None else PickleSerializer()
    with _opened(datadir, snapshots if use_snapshots else None, table_prefix) as source:
        if not use_snapshots:
            source.store = None
        return _replay_to(
            schema, source, until_seq, until_time_ns, timing, progress, serializer
        )


def _replay_to(
    schema: Schema[Any],
    source: _Source,
    until_seq: int | None,
    until_time_ns: int | None,
    timing: bool,
    progress: ProgressCallback | None,
    serializer: ISnapshotSerializer,
) -> PointInTime:
    journal, store = source.journal, source.store
    skipped: list[tuple[int, str]] = []
    model: Any = None
    snap = 0
    if store is not None:
        for seq in store.list():  # newest first
            if until_seq is not None and seq > until_seq:
                continue
            reason = _snapshot_before(journal, seq, until_time_ns)
            if reason is None:
                try:
                    model = serializer.loads(store.load(seq))
                except Exception as e:
                    reason = f"{type(e).__name__}: {e}"
                else:
                    snap = seq
                    break
            skipped.append((seq, reason))
    if model is None:
        _require_full_history(journal, "a replay without a usable snapshot")
        model = schema.new_model()
    last = estimate_last_seq(journal)
    if last is not None and until_seq is not None:
        last = min(last, until_seq)
    replayer = _Replayer(
        schema, model, timing=timing, progress=progress,
        total=None if last is None else max(0, last - snap),
    )
    replayer.last_seq = snap
    ended = True
    if until_seq is None or until_seq > snap:
        for record in journal.replay(snap + 1):
            if until_time_ns is not None and record.time_ns > until_time_ns:
                ended = False
                break
            replayer.apply(record, _journal_id(journal))
            if until_seq is not None and record.seq >= until_seq:
                # Stop on the record, not at the next one: that one may be
                # damage the operator wants to look in front of.
                ended = False
                break
    else:
        ended = False
    time_ns = replayer.last_time_ns
    if time_ns is None and snap:
        # Nothing replayed after the snapshot: its own record tells the time.
        own = _first_record_from(journal, snap)
        if own is not None and own.seq == snap:
            time_ns = own.time_ns
    return PointInTime(model, replayer.last_seq, time_ns, snap, ended, replayer.stats(), skipped)
