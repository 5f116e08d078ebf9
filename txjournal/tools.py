"""
Operator tools on a data directory: :func:`verify`, :func:`inspect` and
:func:`repair`, behind ``python -m txjournal verify|inspect|repair``.

:func:`verify` and :func:`inspect` also read an SQL journal named by URL
(``sqlite:///abs/path.db``, ``postgresql://user@host/db``), and
:func:`verify` a snapshot store named by ``snapshots`` (a URL of the same
forms, or a directory of snapshot files; by default ``DATADIR/snapshots``
for a data directory and none for an SQL journal, whose snapshots are
wherever its service keeps them). Databases are opened read-only (see
:mod:`txjournal.journal.readonly`): no table is created, and a
PostgreSQL journal is never taken over, so a running writer is not fenced.
:func:`repair` works on data directories only: a database keeps every
committed row whole, so there is no torn tail to cut.

They work **without the application's code**: records are read by their
registered command name with MessagePack fields, and snapshots are checked
by their header checksum and SHA-256 digest, never unpickled. That matters
because the person running them is usually looking at a directory that the
application refuses to start on, possibly with a different version of the
code, or on another machine.

Everything here returns plain dataclasses (or dicts) and prints nothing;
:mod:`txjournal.tools_cli` does the printing, so the functions are usable
from scripts and tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from txjournal import record as rec
from txjournal import urls
from txjournal.errors import (
    DataDirLocked,
    JournalCorrupt,
    SnapshotError,
    TxJournalError,
    UnsafeDataDir,
)
from txjournal.fs import OSFileSystem, check_private_dir, write_all
from txjournal.interfaces import IFileSystem
from txjournal.journal.file import FileJournal
from txjournal.journal.readonly import (
    NoJournal,
    NoSnapshotStore,
    ReadOnlyPostgresJournal,
    ReadOnlyPostgresSnapshotStore,
    ReadOnlySQLiteJournal,
    ReadOnlySQLiteSnapshotStore,
    ReadOnlySQLJournal,
    ReadOnlySQLSnapshotStore,
)
from txjournal.lock import DataDirLock
from txjournal.snapshot.file import FileSnapshotStore

Severity = Literal["error", "warning"]

#: Name pattern of the directories :func:`repair` keeps removed data in.
BACKUP_PREFIX = "repair-backup-"
_TEMP_PREFIX = ".tmp-"


class ToolError(TxJournalError):
    """A tool cannot do what was asked; the message says why."""


class NotADataDir(ToolError):
    """The path given is not a data directory."""


class BadSource(NotADataDir):
    """
    SOURCE (or ``--snapshots``) names nothing to read: a malformed or
    unknown URL, an SQLite file that does not exist, a database without the
    journal's (or the snapshot store's) tables. A usage error, like a
    DATADIR that is not a directory.
    """


class NeedsDataDir(NotADataDir):
    """The tool works on data directories only (``repair``, ``rebuild``) and was given a URL."""


class RepairRefused(ToolError):
    """
    :func:`repair` will not cut the journal as asked (damage at or before the
    cut point, a cut point past the end, ...). Nothing was changed.
    """


# -- sources: a data directory or a URL ------------------------------------------

#: The default table prefix of the PostgreSQL journal and of the SQL snapshot stores.
DEFAULT_TABLE_PREFIX = "txjournal"

#: A journal a tool reads: the file journal of a data directory, or an SQL journal read-only.
ToolJournal = FileJournal | ReadOnlySQLJournal

#: A snapshot store a tool reads (never writes).
ToolSnapshots = FileSnapshotStore | ReadOnlySQLSnapshotStore

_SECRET_PATTERNS = (
    # user:password@ in a URL
    (re.compile(r"(://[^:/@\s]*:)[^@\s]*@"), r"\1***@"),
    # password=... in a URL query or a libpq connection string
    (re.compile(r"(password\s*=\s*)('[^']*'|[^&\s]+)", re.IGNORECASE), r"\1***"),
)


def source_name(source: str) -> str:
    """How messages name a SOURCE: the absolute data directory, or the URL without its password."""
    return urls.hide_password(source) if urls.is_url(source) else os.path.abspath(source)


def scrub(text: str, *sources: str | None) -> str:
    """
    ``text`` with every password taken out: each of ``sources`` (URLs as
    typed) replaced by its :func:`source_name`, and anything left that
    reads as ``user:password@`` or ``password=...`` masked. For error
    messages that quote what a driver said.
    """
    for source in sources:
        if source and urls.is_url(source):
            text = text.replace(source, urls.hide_password(source))
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _postgres_url(url: str, what: str) -> None:
    """Refuse, without quoting the password, a PostgreSQL URL libpq cannot parse."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ToolError(
            f"{what} {urls.hide_password(url)} needs psycopg: pip install 'txjournal[postgres]'"
        ) from None
    try:
        conninfo_to_dict(url)
    except Exception as e:
        raise BadSource(f"{what} {urls.hide_password(url)} is not a valid PostgreSQL URL: {scrub(str(e), url)}") from None


def open_sql_journal(source: str, table_prefix: str = DEFAULT_TABLE_PREFIX) -> ReadOnlySQLJournal:
    """
    The SQL journal a URL names, opened read-only (its ``journal_id``
    read, nothing written).

    :raises BadSource: a malformed or unknown URL, a missing SQLite file,
        missing tables, a bad table prefix.
    :raises txjournal.journal.readonly.SourceError: the database cannot be
        read (server down, not a database).
    """
    try:
        url = urls.check(source)
    except ValueError as e:
        raise BadSource(scrub(str(e), source)) from None
    if not url:
        raise BadSource("'file:' names a data directory's journal: give the data directory itself")
    journal: ReadOnlySQLJournal
    if url.startswith("sqlite:"):
        journal = ReadOnlySQLiteJournal(url[len("sqlite://"):])
    else:
        _postgres_url(url, "journal URL")
        try:
            journal = ReadOnlyPostgresJournal(url, table_prefix, location=source_name(url))
        except ValueError as e:
            raise BadSource(str(e)) from None
    try:
        journal.open()
    except NoJournal as e:
        journal.close()
        raise BadSource(scrub(str(e), source)) from None
    except BaseException:
        journal.close()
        raise
    return journal


def open_snapshots(
    snapshots: str | None, datadir: str | None, table_prefix: str = DEFAULT_TABLE_PREFIX
) -> ToolSnapshots | None:
    """
    The snapshot store a tool reads, never writes.

    :param snapshots: ``None``, ``""`` or ``"file:"`` for the default (the
        files in ``DATADIR/snapshots``; for an SQL journal, no store at
        all), an SQLite or PostgreSQL URL, or a directory of snapshot files
        (a data directory stands for its ``snapshots/``).
    :param datadir: the data directory, or ``None`` for an SQL journal.
    :raises BadSource: the URL or directory names no snapshot store.
    """
    if not snapshots or snapshots == "file:":
        if datadir is not None:
            return FileSnapshotStore(os.path.join(datadir, "snapshots"), readonly=True)
        if snapshots == "file:":
            raise BadSource(
                "--snapshots file: means DATADIR/snapshots, and an SQL journal has no data "
                "directory: give the directory of the snapshot files, or a snapshot store URL"
            )
        return None
    if urls.is_url(snapshots):
        try:
            url = urls.check_snapshots(snapshots)
        except ValueError as e:
            raise BadSource(f"--snapshots: {scrub(str(e), snapshots)}") from None
        store: ReadOnlySQLSnapshotStore
        try:
            if url.startswith("sqlite:"):
                store = ReadOnlySQLiteSnapshotStore(url[len("sqlite://"):], table_prefix)
            else:
                _postgres_url(url, "--snapshots")
                store = ReadOnlyPostgresSnapshotStore(url, table_prefix, location=source_name(url))
        except ValueError as e:
            raise BadSource(str(e)) from None
        try:
            store.open()
        except NoSnapshotStore as e:
            store.close()
            raise BadSource(f"--snapshots: {scrub(str(e), snapshots)}") from None
        except BaseException:
            store.close()
            raise
        return store
    path = os.path.abspath(snapshots)
    if not os.path.isdir(path):
        raise BadSource(
            f"--snapshots {path} is neither a directory of snapshot files nor a snapshot store URL"
        )
    if os.path.isdir(os.path.join(path, "snapshots")):
        path = os.path.join(path, "snapshots")  # a data directory
    return FileSnapshotStore(path, readonly=True)


def close_snapshots(store: ToolSnapshots | None) -> None:
    """Close a store :func:`open_snapshots` opened (file stores hold nothing open)."""
    if isinstance(store, ReadOnlySQLSnapshotStore):
        store.close()


def snapshots_location(store: ToolSnapshots) -> str:
    """Where a store's snapshots are, for messages (no password)."""
    return store.directory if isinstance(store, FileSnapshotStore) else store.where


def snapshot_location(store: ToolSnapshots, seq: int) -> str:
    """Where snapshot ``seq`` is, for messages: its file, or its table and seq."""
    if isinstance(store, FileSnapshotStore):
        return store.path(seq)
    return f"{store.where} seq {seq}"


def snapshot_digests(store: ToolSnapshots, seq: int) -> tuple[bytes, bytes]:
    """
    ``(model digest, payload SHA-256)`` of snapshot ``seq``, as stored,
    without reading its payload. Raises :class:`SnapshotError`.
    """
    if isinstance(store, FileSnapshotStore):
        header = store.header(seq)
        return header.model_digest, header.payload_digest
    return store.digests(seq)


# -- verify -----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """
    One thing wrong in a data directory.

    ``severity`` is ``"error"`` for damage that makes start-up refuse or that
    loses data, ``"warning"`` for what start-up handles on its own (a torn
    tail is cut off, an unreadable snapshot is skipped when an older one
    works) but an operator should still know about.
    """

    path: str
    offset: int | None
    seq: int | None
    message: str
    severity: Severity = "error"
    command: str | None = None


@dataclass(frozen=True)
class SegmentInfo:
    """
    One journal segment. ``first_seq`` comes from its name; ``last_seq`` and
    ``records`` are what verification found in it (``last_seq`` is ``None``
    for an empty segment or one not reached because of earlier damage).
    ``verified``: read to its end without damage; ``damaged``: the journal
    check stopped in this segment.
    """

    name: str
    path: str
    size: int
    first_seq: int
    last_seq: int | None
    records: int
    verified: bool
    damaged: bool = False


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    path: str
    seq: int
    size: int | None
    ok: bool


@dataclass(frozen=True)
class StartupCheck:
    """
    When the full check stopped at damage that a valid snapshot covers:
    what start-up itself reads (the journal from ``snapshot + 1``), up to
    ``last_seq``; ``ok`` if that part is intact (start-up would succeed,
    as far as the journal goes).
    """

    snapshot: int
    last_seq: int
    ok: bool


@dataclass(frozen=True)
class VerifyReport:
    """
    What :func:`verify` found. ``journal_complete`` is false when damage
    stopped the journal check before its end: records beyond the damage
    were not looked at, and ``records``/``last_seq`` count only those before.
    """

    datadir: str
    journal_id: int | None
    records: int
    first_seq: int | None
    last_seq: int | None
    journal_complete: bool
    segments: list[SegmentInfo]
    snapshots: list[SnapshotInfo]
    temp_files: list[str]
    problems: list[Problem]
    #: Who holds ``DATADIR/LOCK`` (a running service: its journal may grow
    #: while it is read, so a torn tail may be a write in progress).
    locked_by: str | None = None
    #: Set when damage stopped the full check inside history that a snapshot covers.
    startup: StartupCheck | None = None
    #: ``"file"`` (a data directory), ``"sqlite"`` or ``"postgresql"``.
    backend: str = "file"
    #: An SQL journal's rows, damaged ones included (``records`` counts those that verify).
    rows: int | None = None
    #: Where the snapshots checked are; ``None``: no snapshot store was given.
    snapshot_store: str | None = None
    #: What the check could not tell, or did not look at (not problems).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem at all, not even a warning."""
        return not self.problems

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``journal_id`` as a hex string: JSON numbers lose 64-bit ints)."""
        data = dataclasses.asdict(self)
        data["journal_id"] = None if self.journal_id is None else f"{self.journal_id:016x}"
        data["ok"] = self.ok
        return data


def _check_datadir(datadir: str) -> str:
    path = os.path.abspath(datadir)
    if not os.path.isdir(path):
        raise NotADataDir(f"{path} is not a directory")
    return path


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _guess_command(path: str, offset: int) -> str | None:
    """
    The command name as it reads in the damaged record at ``offset``, if
    the bytes look like one. It is unverified (the checksum failed), so
    callers must say so; it is still the best clue an operator gets.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            head = f.read(rec.PREFIX_SIZE + rec.BODY_HEAD_SIZE + 255)
    except OSError:
        return None
    if len(head) < rec.PREFIX_SIZE + rec.BODY_HEAD_SIZE:
        return None
    name_len = head[rec.PREFIX_SIZE + rec.BODY_HEAD_SIZE - 2]
    start = rec.PREFIX_SIZE + rec.BODY_HEAD_SIZE
    raw = head[start : start + name_len]
    if not name_len or len(raw) < name_len:
        return None
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if name.isprintable() else None


def verify(
    datadir: str,
    *,
    snapshots: str | None = None,
    table_prefix: str = DEFAULT_TABLE_PREFIX,
) -> VerifyReport:
    """
    Check every journal segment and every snapshot of ``datadir``; change nothing.

    ``datadir`` may also be an SQL journal's URL: see :func:`verify_sql`.
    ``snapshots`` names the snapshot store to check instead of
    ``DATADIR/snapshots`` (see :func:`open_snapshots`); ``table_prefix``
    is that of a PostgreSQL journal's tables and of SQL snapshot tables.

    The journal is read from its first segment with a read-only
    :class:`~txjournal.journal.file.FileJournal`, so the rules are exactly
    those of start-up: the first corruption stops the journal check (what
    follows it cannot be trusted to be where it seems) and is reported with
    its file, offset, sequence number and, when readable, command name. A
    torn tail is a warning: start-up cuts it off, and those commands were
    never acknowledged. Each snapshot is checked (header checksum, covered
    sequence number, length, SHA-256 digest) but never unpickled.

    Also reported: record fields that are not a MessagePack map, logged
    times that go backwards, a snapshot beyond the end of the journal
    (start-up refuses: history would be lost), and a pruned journal whose
    first records no valid snapshot covers.

    Start-up reads the journal only from the newest loadable snapshot on,
    so damage in older history does not stop it. When the full check stops
    at damage that a valid snapshot covers, the journal is also replayed
    from that snapshot, as start-up would, and the result is in
    :attr:`VerifyReport.startup`: without it, an operator could cut away
    good records to "repair" a directory that starts fine.

    :raises NotADataDir: if ``datadir`` is not a directory; :class:`BadSource`
        (a subclass) if ``snapshots`` names no store.
    """
    if urls.is_url(datadir):
        return verify_sql(datadir, snapshots=snapshots, table_prefix=table_prefix)
    datadir = _check_datadir(datadir)
    store = open_snapshots(snapshots, datadir, table_prefix)
    assert store is not None  # a data directory always has its default store
    try:
        return _verify_datadir(datadir, store)
    finally:
        close_snapshots(store)


def _verify_datadir(datadir: str, store: ToolSnapshots) -> VerifyReport:
    problems: list[Problem] = []
    journal_dir = os.path.join(datadir, "journal")
    journal = FileJournal(journal_dir, readonly=True)
    journal.open()
    segments = list(journal.segments)
    temp_files = _temp_files(journal_dir)

    # Per segment: records seen and the last seq, filled in while replaying.
    counts = [0] * len(segments)
    lasts: list[int | None] = [None] * len(segments)
    reached = 0  # index of the segment the replay is in
    records = 0
    first_seen: int | None = None
    last_seen: int | None = None
    last_time_ns = 0
    complete = True
    start_seq = journal.first_seq() or 1
    damaged_seq = damage_index = 0
    checked = _check_snapshots(store)
    keep = max((info.seq for info, _reason in checked), default=0)
    try:
        for record in journal.replay(start_seq, keep):
            while reached + 1 < len(segments) and segments[reached + 1][0] <= record.seq:
                reached += 1
            counts[reached] += 1
            lasts[reached] = record.seq
            records += 1
            if first_seen is None:
                first_seen = record.seq
            last_seen = record.seq
            path = segments[reached][1]
            if record.time_ns < last_time_ns:
                problems.append(Problem(
                    path, None, record.seq,
                    f"logged time goes backwards: {iso_time(record.time_ns)} after "
                    f"{iso_time(last_time_ns)}", "warning", record.name,
                ))
            last_time_ns = max(last_time_ns, record.time_ns)
            for message in _record_problems(record):
                problems.append(Problem(path, None, record.seq, message, "error", record.name))
    except JournalCorrupt as e:
        complete = False
        damaged_seq = (last_seen + 1) if last_seen is not None else start_seq
        damage_index = len(problems)
        problems.append(_corruption_problem(e, damaged_seq))
        for i, (_first, path) in enumerate(segments):
            if path == e.path:
                reached = i
                break
    torn = _torn_problem(journal, (last_seen or start_seq - 1) + 1)
    if torn is not None:
        problems.append(torn)

    segment_infos = []
    for i, (first, path) in enumerate(segments):
        verified = i < reached or (i == reached and complete)
        damaged = i == reached and not complete
        segment_infos.append(SegmentInfo(
            os.path.basename(path), path, _size(path) or 0, first, lasts[i], counts[i],
            verified, damaged,
        ))

    snapshots, snapshot_problems = _verify_snapshots(
        checked, last_seen if complete else None, complete
    )
    problems.extend(snapshot_problems)
    if isinstance(store, FileSnapshotStore):
        temp_files.extend(_temp_files(store.directory))

    startup = None
    newest_ok = max((s.seq for s in snapshots if s.ok), default=None)
    if not complete and newest_ok is not None and newest_ok >= damaged_seq:
        # The damage is in history that a snapshot covers: start-up itself
        # may not read it. Say what start-up does read, or an operator
        # might cut away good records to "repair" a journal that starts.
        startup = _check_startup(journal_dir, newest_ok, snapshots, problems, damage_index)

    first_segment = segments[0][0] if segments else None
    if complete and first_segment is not None and first_segment > 1:
        # A pruned journal: only a snapshot at or after the gap can rebuild the model.
        usable = [s for s in snapshots if s.ok and s.seq >= first_segment - 1]
        if not usable:
            problems.append(Problem(
                segments[0][1], 0, first_segment - 1,
                f"the journal starts at sequence number {first_segment} (older "
                f"segments were pruned) but no valid snapshot covers "
                f"{first_segment - 1}: the model cannot be rebuilt",
            ))

    try:
        check_private_dir(datadir)
    except UnsafeDataDir as e:
        problems.append(Problem(datadir, None, None, f"start-up refuses this directory: {e}"))
    for name in sorted(os.listdir(journal_dir) if os.path.isdir(journal_dir) else []):
        if ".damaged-tail-" in name:
            problems.append(Problem(
                os.path.join(journal_dir, name), None, None,
                "bytes of an invalid last record that start-up cut off and kept: a torn "
                "write, or a command that may have been acknowledged; inspect it, then "
                "remove it",
                "warning",
            ))

    return VerifyReport(
        datadir=datadir,
        journal_id=journal.journal_id if segments and journal.salt else None,
        records=records,
        first_seq=first_seen,
        last_seq=last_seen,
        journal_complete=complete,
        segments=segment_infos,
        snapshots=snapshots,
        temp_files=temp_files,
        problems=problems,
        locked_by=_lock_holder(datadir),
        startup=startup,
        snapshot_store=snapshots_location(store),
    )


def _corruption_problem(e: JournalCorrupt, expected: int, note: str = "") -> Problem:
    """
    A :class:`Problem` for a replay's :class:`JournalCorrupt`, with
    ``expected`` (the sequence number that belongs at that offset) as its
    seq: after a checksum failure the record's own seq field may be the
    damaged part, so it is only shown in the message.
    """
    command = e.command
    message = str(e.reason)
    if command is None and e.offset >= rec.SEGMENT_HEADER_SIZE:
        guess = _guess_command(e.path, e.offset)
        if guess is not None:
            command = guess
            message += f"; the damaged record reads as command {guess!r} (unverified)"
    if e.seq is not None and e.seq != expected:
        message += f"; its sequence number field reads {e.seq}"
    return Problem(e.path, e.offset, expected, message + note, "error", command)


def _torn_problem(journal: FileJournal, seq: int) -> Problem | None:
    if journal.torn_tail is None:
        return None
    path, offset, reason = journal.torn_tail
    return Problem(
        path, offset, seq,
        f"torn write at the end of the journal ({reason}): "
        f"{(_size(path) or offset) - offset} bytes of commands that were never "
        f"acknowledged; start-up cuts them off",
        "warning",
    )


def _check_startup(
    journal_dir: str,
    snapshot: int,
    snapshots: list[SnapshotInfo],
    problems: list[Problem],
    damage_index: int,
) -> StartupCheck:
    """
    Replay from ``snapshot + 1`` as start-up does (read-only); add what it
    finds to ``problems``, and when start-up gets through, say so in the
    message of the damage that stopped the full check
    (``problems[damage_index]``).
    """
    journal = FileJournal(journal_dir, readonly=True)
    journal.open()
    last = snapshot
    yielded = False
    seen = {(p.path, p.offset) for p in problems}
    try:
        keep = max((s.seq for s in snapshots), default=0)
        for record in journal.replay(snapshot + 1, keep):
            last = record.seq
            yielded = True
    except JournalCorrupt as e:
        if (e.path, e.offset) not in seen:
            # Before the first record replayed, the expected seq is unknown:
            # the damage may sit among records the snapshot covers.
            expected = last + 1 if yielded else (e.seq if e.seq is not None else last + 1)
            problems.append(_corruption_problem(
                e, expected, f" (found replaying from snapshot {snapshot}, as start-up does)"
            ))
        return StartupCheck(snapshot, last, ok=False)
    last = journal.next_seq - 1  # also when nothing after the snapshot was read
    torn = _torn_problem(journal, last + 1)
    if torn is not None and (torn.path, torn.offset) not in seen:
        problems.append(torn)
    beyond = [s for s in snapshots if s.seq > last]
    for s in beyond:
        problems.append(Problem(
            s.path, None, s.seq,
            f"snapshot covers sequence number {s.seq} but the journal ends at {last}: "
            f"records are missing and start-up refuses",
        ))
    if beyond:
        return StartupCheck(snapshot, last, ok=False)
    damage = problems[damage_index]
    problems[damage_index] = dataclasses.replace(damage, message=(
        f"{damage.message}; start-up is not affected (it loads snapshot "
        f"{snapshot} and replays {snapshot + 1}..{last}, which are intact), but the "
        f"model can no longer be rebuilt from the journal alone"
    ))
    return StartupCheck(snapshot, last, ok=True)


def _temp_files(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names if n.startswith(_TEMP_PREFIX))


def _record_problems(record: rec.Record) -> list[str]:
    """What is wrong with a record that verified: a kind replay refuses, fields that do not decode."""
    out = []
    if record.kind not in KIND_NAMES:
        out.append(
            f"a record of kind {record.kind}, unknown to this version of txjournal: "
            f"replay and start-up refuse it"
        )
    fields_problem = _check_fields(record.fields)
    if fields_problem is not None:
        out.append(f"fields {fields_problem}")
    return out


def _check_fields(fields: bytes) -> str | None:
    try:
        value = msgpack.unpackb(fields, raw=False, strict_map_key=False)
    except Exception as e:
        return f"do not decode as MessagePack: {e}"
    if not isinstance(value, dict):
        return f"are a MessagePack {type(value).__name__}, not a map"
    return None


def _check_snapshots(store: ToolSnapshots) -> list[tuple[SnapshotInfo, str]]:
    """
    Every snapshot of ``store``, in sequence order, checked as start-up
    checks it (never unpickled), with the reason when it does not load.
    """
    out: list[tuple[SnapshotInfo, str]] = []
    for seq in sorted(store.list()):
        path = snapshot_location(store, seq)
        try:
            payload = store.load(seq)
        except SnapshotError as e:
            ok, reason, size = False, str(e), None
        else:
            ok, reason, size = True, "", len(payload)
        if isinstance(store, FileSnapshotStore):
            name, size = os.path.basename(path), _size(path)
        else:
            name = store.table
        out.append((SnapshotInfo(name, path, seq, size, ok), reason))
    return out


def _verify_snapshots(
    checked: list[tuple[SnapshotInfo, str]], journal_end: int | None, complete: bool
) -> tuple[list[SnapshotInfo], list[Problem]]:
    infos: list[SnapshotInfo] = []
    problems: list[Problem] = []
    newest_ok = max((info.seq for info, _r in checked if info.ok), default=None)
    for info, reason in checked:
        seq, path, ok = info.seq, info.path, info.ok
        infos.append(info)
        if not ok:
            # Only the newest snapshots matter to start-up; an older bad one
            # is still worth knowing about, since it is a fallback no more.
            severity: Severity = "error" if newest_ok is None or seq > newest_ok else "warning"
            problems.append(Problem(path, None, seq, reason, severity))
        if complete and seq > (journal_end or 0):
            problems.append(Problem(
                path, None, seq,
                f"snapshot covers sequence number {seq} but the journal ends at "
                f"{journal_end or 0}: records are missing and start-up refuses",
            ))
    return infos, problems


def _loads(store: FileSnapshotStore, seq: int) -> tuple[bool, str]:
    try:
        store.load(seq)
    except SnapshotError as e:
        return False, str(e)
    return True, ""


# -- verify an SQL journal ----------------------------------------------------------

#: Below any sequence number a row can hold (both databases' integers are 64-bit).
_BEFORE_ALL = -(2**63)

#: What :func:`verify_sql` adds to a damaged row's problem once a snapshot covers it.
_STARTUP_UNAFFECTED = (
    "; start-up is not affected (it loads snapshot {snap} and replays {start}..{last}, "
    "which are intact), but the model can no longer be rebuilt from the journal alone"
)


def verify_sql(
    url: str,
    *,
    snapshots: str | None = None,
    table_prefix: str = DEFAULT_TABLE_PREFIX,
) -> VerifyReport:
    """
    Check every row of the SQL journal ``url`` and, if ``snapshots``
    names a store (see :func:`open_snapshots`), every snapshot; change
    nothing. The databases are opened read-only: no table is created, the
    writer epoch is left alone (the running writer is not fenced).

    Rows are read in sequence order, in one read-only transaction (a
    writer may append and prune meanwhile), and each row's stored record
    is decoded with the journal's salt as replay decodes it. Unlike a
    segment file, a damaged row does not hide the rows after it, so the
    check goes on to the end and reports every problem: missing sequence
    numbers (a gap), a stored record that does not verify or holds another
    sequence number, a record of a kind this version does not know,
    fields that do not decode, logged times that go backwards (a
    warning), and columns that disagree with the stored record (a
    warning: replay trusts the record, SQL queries read the columns).

    With a snapshot store: snapshots that do not load (checked, never
    unpickled), a snapshot beyond the journal's end, a pruned journal no
    snapshot covers, and, when damage lies in history the newest valid
    snapshot covers, whether start-up (which replays only after it) is
    affected (:attr:`VerifyReport.startup`). Without one, an SQL
    journal's snapshots are not looked at, which :attr:`VerifyReport.notes`
    says: the tools do not know where its service keeps them.

    :raises BadSource: a malformed URL, a missing SQLite file, missing tables.
    :raises txjournal.journal.readonly.SourceError: the database cannot be read.
    """
    journal = open_sql_journal(url, table_prefix)
    store: ToolSnapshots | None = None
    try:
        store = open_snapshots(snapshots, None, table_prefix)
        # Snapshots first: one written while the journal is read must not
        # look as if it covered rows the journal's (older) view lacks.
        checked = _check_snapshots(store) if store is not None else []
        with journal.consistent():
            return _verify_rows(url, journal, store, checked)
    finally:
        journal.close()
        close_snapshots(store)


def _column_mismatch(record: rec.Record, row: tuple[int, int, int, str, int, str | None]) -> str | None:
    """How the columns of a row disagree with its stored record, if they do."""
    _seq, time_ns, kind, name, version, user = row
    diffs = [
        f"{label} column {column!r}, record {stored!r}"
        for label, column, stored in (
            ("time_ns", time_ns, record.time_ns),
            ("kind", kind, record.kind),
            ("name", name, record.name),
            ("version", version, record.version),
            ("user", user, record.user),
        )
        if column != stored
    ]
    return "; ".join(diffs) or None


def _verify_rows(
    url: str,
    journal: ReadOnlySQLJournal,
    store: ToolSnapshots | None,
    checked: list[tuple[SnapshotInfo, str]],
) -> VerifyReport:
    where = journal.where
    problems: list[Problem] = []
    #: (index in problems, last seq it affects) of each problem start-up would trip on.
    damage: list[tuple[int, int]] = []
    rows = records = 0
    first: int | None = None
    last: int | None = None
    last_time_ns = 0
    after = _BEFORE_ALL
    while True:
        page = journal.rows(after)
        if not page:
            break
        for seq, time_ns, kind, name, version, user, blob in page:
            after = seq
            rows += 1
            if first is None:
                first = seq
            elif last is not None and seq != last + 1:
                damage.append((len(problems), seq - 1))
                problems.append(Problem(
                    where, None, last + 1,
                    f"records {last + 1}..{seq - 1} are missing (the next row is {seq}); "
                    f"replay and start-up refuse the gap",
                ))
            last = seq
            try:
                record = journal.decode(seq, blob)
            except JournalCorrupt as e:
                damage.append((len(problems), seq))
                problems.append(Problem(
                    where, None, seq,
                    f"{e.reason}; the row's name column reads {name!r} (unverified)",
                    "error", name,
                ))
                continue
            records += 1
            mismatch = _column_mismatch(record, (seq, time_ns, kind, name, version, user))
            if mismatch is not None:
                problems.append(Problem(
                    where, None, seq,
                    f"the row's columns disagree with its stored record ({mismatch}): replay "
                    f"uses the record, SQL queries on the columns see something else",
                    "warning", record.name,
                ))
            if record.time_ns < last_time_ns:
                problems.append(Problem(
                    where, None, seq,
                    f"logged time goes backwards: {iso_time(record.time_ns)} after "
                    f"{iso_time(last_time_ns)}", "warning", record.name,
                ))
            last_time_ns = max(last_time_ns, record.time_ns)
            for message in _record_problems(record):
                damage.append((len(problems), seq))
                problems.append(Problem(where, None, seq, message, "error", record.name))

    snapshots, snapshot_problems = _verify_snapshots(checked, last or 0, True)
    problems.extend(snapshot_problems)
    notes: list[str] = []
    newest_ok = max((s.seq for s in snapshots if s.ok), default=None)
    if store is None:
        notes.append(
            "snapshots not checked: an SQL journal's snapshots are wherever its service keeps "
            "them (DATADIR/snapshots unless it was given --snapshots); name them with "
            "--snapshots URL or --snapshots DIRECTORY"
        )
    if first is not None and first > 1:
        if store is None:
            notes.append(
                f"the journal starts at sequence number {first} (older rows were pruned): "
                f"start-up needs a snapshot covering {first - 1} or later, which was not "
                f"checked (no --snapshots)"
            )
        elif not any(s.ok and s.seq >= first - 1 for s in snapshots):
            problems.append(Problem(
                where, None, first - 1,
                f"the journal starts at sequence number {first} (older rows were pruned) "
                f"but no valid snapshot in {snapshots_location(store)} covers {first - 1}: "
                f"the model cannot be rebuilt",
            ))

    startup = None
    end = last or 0
    covered = [i for i, upto in damage if newest_ok is not None and upto <= newest_ok]
    if covered and newest_ok is not None:
        # Start-up replays only after the newest snapshot that loads: damage
        # before it does not stop start-up, but the journal alone no longer
        # rebuilds the model. Say which, or an operator might "repair" a
        # journal that starts.
        ok = (
            not any(upto > newest_ok for _i, upto in damage)
            and not any(s.seq > end for s in snapshots)
            and (first is None or first <= newest_ok + 1)
        )
        startup = StartupCheck(newest_ok, max(end, newest_ok), ok)
        if ok:
            note = _STARTUP_UNAFFECTED.format(snap=newest_ok, start=newest_ok + 1, last=end)
            for i in covered:
                problems[i] = dataclasses.replace(problems[i], message=problems[i].message + note)

    backend = "sqlite" if isinstance(journal, ReadOnlySQLiteJournal) else "postgresql"
    return VerifyReport(
        datadir=source_name(url),
        journal_id=journal.journal_id_found,
        records=records,
        first_seq=first,
        last_seq=last,
        journal_complete=True,
        segments=[],
        snapshots=snapshots,
        temp_files=[],
        problems=problems,
        startup=startup,
        backend=backend,
        rows=rows,
        snapshot_store=None if store is None else snapshots_location(store),
        notes=notes,
    )


# -- inspect ----------------------------------------------------------------------


def iso_ns(text: str) -> int:
    """
    The first nanosecond of an ISO 8601 date or time (UTC when it has no
    zone), as ns since the epoch. Raises :class:`ValueError`.
    """
    moment = datetime.datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return ((moment - epoch) // datetime.timedelta(microseconds=1)) * 1000


def iso_time(time_ns: int) -> str:
    """ISO 8601 in UTC to the microsecond (the exact value is in ``time_ns``)."""
    seconds, ns = divmod(time_ns, 1_000_000_000)
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"@{time_ns}ns"
    return moment.replace(microsecond=ns // 1000).isoformat(timespec="microseconds").replace(
        "+00:00", "Z"
    )


#: ``kind`` of a record as :func:`record_dict` shows it.
KIND_NAMES = {rec.KIND_COMMAND: "command", rec.KIND_QUERY: "query"}


def kind_name(kind: int) -> str:
    """``"command"``, ``"query"``, or ``"kind N"`` for a kind this code does not know."""
    return KIND_NAMES.get(kind, f"kind {kind}")


def record_dict(record: rec.Record) -> dict[str, Any]:
    """
    A decoded record as plain data: fields are decoded from MessagePack
    (``bytes`` stay ``bytes``; see :func:`to_jsonable`). A record whose
    fields do not decode gets ``fields: None`` and a ``fields_error``.

    ``kind`` is ``"command"`` (``command`` is the command's name and
    ``fields`` its fields) or ``"query"`` (a query audit record:
    ``command`` is the query's name, ``fields`` its arguments, ``user``
    who ran it); see :func:`kind_name`.
    """
    out: dict[str, Any] = {
        "seq": record.seq,
        "time": iso_time(record.time_ns),
        "time_ns": record.time_ns,
        "command": record.name,
        "version": record.version,
        "kind": kind_name(record.kind),
        "user": record.user,
    }
    try:
        out["fields"] = msgpack.unpackb(record.fields, raw=False, strict_map_key=False)
    except Exception as e:
        out["fields"] = None
        out["fields_error"] = f"{type(e).__name__}: {e}"
    return out


def inspect(
    datadir: str,
    from_seq: int | None = None,
    to_seq: int | None = None,
    command: str | None = None,
    kind: str | None = None,
    *,
    table_prefix: str = DEFAULT_TABLE_PREFIX,
) -> Iterator[dict[str, Any]]:
    """
    Yield the journal's records as dicts (see :func:`record_dict`), in order.

    ``datadir`` may also be an SQL journal's URL (``table_prefix``: that of
    a PostgreSQL journal's tables); its rows are read read-only, in one
    transaction, and a gap or a row that does not verify raises
    :class:`~txjournal.errors.JournalCorrupt` when reached, as for files.

    Streaming: the journal is read one segment at a time and reading stops
    at ``to_seq``, so memory stays bounded by the segment size
    however long the journal is. Damage ahead raises
    :class:`~txjournal.errors.JournalCorrupt` when it is reached, after
    every record before it has been yielded; a torn tail simply ends the
    records (those were never acknowledged).

    :param from_seq: first sequence number to show (default: the first held).
    :param to_seq: last sequence number to show (default: the end).
    :param command: show only records of this command (or query) name.
    :param kind: show only records of this kind (``"command"``, ``"query"``).
    :raises NotADataDir: if ``datadir`` is not a directory, :class:`BadSource`
        if a URL names no journal (at once, not at the first ``next``).
    """
    if urls.is_url(datadir):
        sql = open_sql_journal(datadir, table_prefix)
        return _sql_records(sql, from_seq, to_seq, command, kind)
    datadir = _check_datadir(datadir)
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    return _records(journal, from_seq, to_seq, command, kind)


def _sql_records(
    journal: ReadOnlySQLJournal,
    from_seq: int | None,
    to_seq: int | None,
    command: str | None,
    kind: str | None,
) -> Iterator[dict[str, Any]]:
    try:
        with journal.consistent():
            yield from _records(journal, from_seq, to_seq, command, kind)
    finally:
        journal.close()


def _records(
    journal: ToolJournal,
    from_seq: int | None,
    to_seq: int | None,
    command: str | None,
    kind: str | None = None,
) -> Iterator[dict[str, Any]]:
    first = journal.first_seq()
    if first is None:
        return
    start = max(first, from_seq or first)
    if to_seq is not None and to_seq < start:
        return
    for record in journal.replay(start):
        if (command is None or record.name == command) and (
            kind is None or kind_name(record.kind) == kind
        ):
            yield record_dict(record)
        if to_seq is not None and record.seq >= to_seq:
            # Stop here, not at the next record: that one may be the damage
            # the operator is trying to look in front of.
            return


def to_jsonable(value: Any) -> Any:
    """
    A JSON-ready copy of decoded fields: ``bytes`` become ``{"base64": ...}``,
    map keys that JSON cannot hold become strings (``bytes`` keys as
    ``"base64:<...>"``), MessagePack extension values
    ``{"ext": code, "base64": ...}``.
    """
    if isinstance(value, bytes):
        return {"base64": _b64(value)}
    if isinstance(value, msgpack.ExtType):
        return {"ext": value.code, "base64": _b64(value.data)}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(k, bytes):
                key = "base64:" + _b64(k)
            elif isinstance(k, str):
                key = k
            elif k is None or isinstance(k, (bool, int, float)):
                key = json.dumps(k)
            else:
                key = json.dumps(to_jsonable(k), sort_keys=True)
            out[key] = to_jsonable(v)
        return out
    return value


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


# -- repair -----------------------------------------------------------------------


@dataclass(frozen=True)
class TruncatedSegment:
    """A segment cut short: bytes ``new_size..original_size`` went to ``backup``."""

    path: str
    original_size: int
    new_size: int
    backup: str | None


@dataclass(frozen=True)
class MovedFile:
    """A whole file moved out of the way; ``backup`` is where it went."""

    path: str
    size: int
    backup: str | None


@dataclass(frozen=True)
class RepairReport:
    """
    What :func:`repair` did, or, with ``dry_run``, would do.

    After a repair the journal's last record is ``truncate_after`` and
    start-up succeeds (as far as the journal and the snapshots beyond it
    go; :func:`verify` says whether anything else is wrong).
    """

    datadir: str
    truncate_after: int
    dry_run: bool
    first_seq: int
    kept_records: int
    truncated: TruncatedSegment | None
    removed_segments: list[MovedFile]
    moved_snapshots: list[MovedFile]
    backup_dir: str | None
    manifest: str | None = None
    removed_bytes: int = field(default=0)

    @property
    def changes_nothing(self) -> bool:
        return self.truncated is None and not self.removed_segments and not self.moved_snapshots

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["changes_nothing"] = self.changes_nothing
        return data


@dataclass
class _Cut:
    """Where the record ``truncate_after`` ends, found by scanning."""

    index: int
    offset: int
    records: int


def _scan_to(
    fs: IFileSystem, segments: list[tuple[int, str]], truncate_after: int
) -> _Cut:
    """
    Decode records from the first segment up to and including
    ``truncate_after`` with :func:`txjournal.record.decode_at`, checking
    headers, salts and density exactly as start-up will; return where
    that record ends. Nothing after it is read, so damage there (the
    reason for the repair) does not get in the way.

    :raises RepairRefused: if anything up to ``truncate_after`` is damaged
        or missing, naming what and where.
    """
    first = segments[0][0]
    if truncate_after < first - 1:
        raise RepairRefused(
            f"the journal starts at sequence number {first} (older segments were "
            f"pruned): it cannot be cut after {truncate_after}"
        )
    salt: bytes | None = None
    expected = first
    for i, (seg_first, path) in enumerate(segments):
        data = memoryview(fs.read(path))
        try:
            header = rec.decode_segment_header(data)
        except rec.BadSegmentHeader as e:
            if i == 0:
                raise RepairRefused(
                    f"{path}: bad segment header ({e}) in the first segment: not even "
                    f"the journal's identity can be kept, so cutting cannot help; move "
                    f"the data directory aside and restore it from a backup"
                ) from None
            raise RepairRefused(
                f"{path}: bad segment header ({e}) at or before record "
                f"{truncate_after}; choose --truncate-after {expected - 1} or less"
            ) from None
        if header.first_seq != seg_first and i == 0:
            raise RepairRefused(
                f"{path}: header says the first segment starts at {header.first_seq}, "
                f"its name says {seg_first}; cutting cannot help: move the data "
                f"directory aside and restore it from a backup"
            )
        if header.first_seq != seg_first:
            raise RepairRefused(
                f"{path}: header says the segment starts at {header.first_seq}, its "
                f"name says {seg_first}; choose --truncate-after {expected - 1} or less"
            )
        if salt is None:
            salt = header.salt_bytes
        elif header.salt_bytes != salt:
            raise RepairRefused(
                f"{path}: segment belongs to another journal (salt differs); choose "
                f"--truncate-after {expected - 1} or less"
            )
        if seg_first != expected:
            raise RepairRefused(
                f"{path}: records {expected}..{seg_first - 1} are missing before this "
                f"segment; choose --truncate-after {expected - 1} or less"
            )
        offset = rec.SEGMENT_HEADER_SIZE
        if expected - 1 == truncate_after:
            return _Cut(i, offset, expected - first)
        while offset < len(data):
            try:
                record, nxt = rec.decode_at(data, offset, salt)
            except rec.RecordError as e:
                # Even bytes after the last record of a segment that is not
                # the last one are corruption to start-up: keeping them
                # would not make the journal start.
                raise RepairRefused(
                    f"{path} at offset {offset}: record {expected} is damaged "
                    f"({e.reason}), so the journal cannot be kept up to "
                    f"{truncate_after}; choose --truncate-after {expected - 1} or less"
                ) from None
            if record.seq != expected:
                raise RepairRefused(
                    f"{path} at offset {offset}: expected record {expected}, found "
                    f"{record.seq}; choose --truncate-after {expected - 1} or less"
                )
            if record.seq == truncate_after:
                return _Cut(i, nxt, expected - first + 1)
            expected += 1
            offset = nxt
        if i == len(segments) - 1:
            raise RepairRefused(
                f"the journal's readable records end at {expected - 1}, before "
                f"{truncate_after}: there is nothing to cut after {truncate_after}"
            )
    raise AssertionError("unreachable: the last segment returns or raises")


def _lock_holder(datadir: str) -> str | None:
    """
    Who holds ``DATADIR/LOCK``, or ``None``, found with a shared ``flock``
    probe on a read-only descriptor: a dry run must not create or rewrite
    the lock file (taking :class:`DataDirLock` would).
    """
    import fcntl

    path = os.path.join(datadir, "LOCK")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            return holder or "holder unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def repair(
    datadir: str,
    truncate_after: int,
    *,
    dry_run: bool = False,
    fs: IFileSystem | None = None,
) -> RepairReport:
    """
    Cut the journal so that its last record is ``truncate_after``.

    This is the way out when start-up refuses because of damage in the
    middle of the journal: the operator decides, with :func:`verify` and
    :func:`inspect`, how much history to give up, and nothing is thrown
    away: every removed byte is kept under
    ``DATADIR/repair-backup-<UTC timestamp>/`` (with a ``MANIFEST.json``
    saying where each piece came from), so the repair can be undone.

    Steps, each durable before the next, so that a crash part-way leaves a
    directory that start-up refuses or recovers exactly, and that running
    the same repair again finishes: take ``DATADIR/LOCK``; scan records up
    to ``truncate_after`` (:func:`_scan_to`; damage after it is the point,
    damage before it refuses); copy the bytes after the cut point of its
    segment into the backup and write the manifest, fsync; move snapshots
    covering more than ``truncate_after`` into the backup (start-up would
    refuse them: they prove history the journal no longer has); move later
    segments into the backup, newest first; truncate the segment and fsync.

    Whole files are *moved* (``rename`` within the data directory) rather
    than copied and unlinked: a rename is atomic, so a crash never leaves
    a file in neither place, and it needs no free space, which matters
    because the damage being repaired is often the result of a full disk.

    :param dry_run: find out and report what would be done, change nothing
        (not even the lock file).
    :raises NotADataDir: if ``datadir`` is not a directory.
    :raises DataDirLocked: while another owner holds ``DATADIR/LOCK``.
    :raises RepairRefused: if the journal cannot be cut there (see
        :func:`_scan_to`); nothing was changed.
    :raises NeedsDataDir: ``datadir`` is a journal URL (see :data:`REPAIR_SQL`).
    """
    if urls.is_url(datadir):
        raise NeedsDataDir(REPAIR_SQL.format(source=source_name(datadir)))
    datadir = _check_datadir(datadir)
    if truncate_after < 0:
        raise RepairRefused(f"--truncate-after must be 0 or more, not {truncate_after}")
    fs = fs if fs is not None else OSFileSystem()
    lock: DataDirLock | None = None
    if dry_run:
        holder = _lock_holder(datadir)
        if holder is not None:
            raise DataDirLocked(os.path.join(datadir, "LOCK"), holder)
    else:
        lock = DataDirLock(datadir)
        lock.acquire()
    try:
        return _repair_locked(fs, datadir, truncate_after, dry_run)
    finally:
        if lock is not None:
            lock.release()


#: Why :func:`repair` refuses an SQL journal, and what to do instead.
REPAIR_SQL = (
    "repair cuts the journal files of a data directory; {source} is a database, which keeps "
    "every committed row whole, so there is no torn tail to cut and nothing to repair in "
    "place. Find the damage with 'python -m txjournal verify {source}', then restore the "
    "damaged or missing rows from a backup or a replica; or, to give up the history from "
    "the first bad row on (as repair does for files), stop the writer, back the database "
    "up, delete the rows from that sequence number on from the journal's records table and "
    "any snapshot covering them, and start the writer again"
)


def _repair_locked(
    fs: IFileSystem, datadir: str, truncate_after: int, dry_run: bool
) -> RepairReport:
    journal_dir = os.path.join(datadir, "journal")
    journal = FileJournal(journal_dir, readonly=True, fs=fs)
    journal.open()
    segments = list(journal.segments)
    if not segments:
        raise RepairRefused(f"{journal_dir} holds no journal segments: nothing to cut")
    cut = _scan_to(fs, segments, truncate_after)
    target_path = segments[cut.index][1]
    target_size = fs.size(target_path)
    later = segments[cut.index + 1 :]
    store = FileSnapshotStore(os.path.join(datadir, "snapshots"), readonly=True, fs=fs)
    beyond = sorted(s for s in store.list() if s > truncate_after)
    first = segments[0][0]
    if first > 1 and not any(
        first - 1 <= s <= truncate_after and _loads(store, s)[0] for s in store.list()
    ):
        raise RepairRefused(
            f"the journal starts at {first} (older segments were pruned) and no valid "
            f"snapshot between {first - 1} and {truncate_after} would remain: start-up "
            f"could not rebuild the model after this cut"
        )

    backup = None if dry_run else _backup_path(datadir)

    def dest(kind: str, name: str) -> str | None:
        return None if backup is None else os.path.join(backup, kind, name)

    truncated = None
    if target_size > cut.offset:
        truncated = TruncatedSegment(
            target_path, target_size, cut.offset,
            dest("journal", f"{os.path.basename(target_path)}.from-{cut.offset}"),
        )
    removed = [
        MovedFile(path, fs.size(path), dest("journal", os.path.basename(path)))
        for _first, path in later
    ]
    moved = [
        MovedFile(store.path(s), _size(store.path(s)) or 0, dest("snapshots", os.path.basename(store.path(s))))
        for s in beyond
    ]
    removed_bytes = (
        (truncated.original_size - truncated.new_size if truncated else 0)
        + sum(m.size for m in removed)
    )
    report = RepairReport(
        datadir=datadir,
        truncate_after=truncate_after,
        dry_run=dry_run,
        first_seq=segments[0][0],
        kept_records=cut.records,
        truncated=truncated,
        removed_segments=removed,
        moved_snapshots=moved,
        backup_dir=backup,
        removed_bytes=removed_bytes,
    )
    if dry_run or backup is None:
        return report
    if report.changes_nothing:
        return dataclasses.replace(report, backup_dir=None)

    # 1. Copies and the manifest first, durable before anything is removed.
    # One level at a time: os.makedirs gives only the leaf the 0700 mode.
    for sub in ("", "journal", "snapshots"):
        fs.makedirs(os.path.join(backup, sub))
    if truncated is not None:
        assert truncated.backup is not None
        tail = fs.read(target_path)[truncated.new_size : truncated.original_size]
        _write_durably(fs, truncated.backup, tail)
    manifest = os.path.join(backup, "MANIFEST.json")
    _write_durably(fs, manifest, _manifest(report).encode("utf-8"))
    for sub in ("journal", "snapshots"):
        fs.fsync_dir(os.path.join(backup, sub))
    fs.fsync_dir(backup)
    fs.fsync_dir(datadir)
    # 2. Snapshots that cover records about to go.
    for m in moved:
        assert m.backup is not None
        fs.rename(m.path, m.backup)
    if moved:
        fs.fsync_dir(os.path.join(backup, "snapshots"))
        fs.fsync_dir(store.directory)
    # 3. Later segments, newest first, so the journal only ever gets shorter.
    for m in reversed(removed):
        assert m.backup is not None
        fs.rename(m.path, m.backup)
        fs.fsync_dir(os.path.join(backup, "journal"))
        fs.fsync_dir(journal_dir)
    # 4. The cut itself.
    if truncated is not None:
        fs.truncate(target_path, truncated.new_size)
        fd = fs.open_append(target_path)
        try:
            fs.fsync(fd)
        finally:
            fs.close(fd)
    return dataclasses.replace(report, manifest=manifest)


def _backup_path(datadir: str) -> str:
    """A fresh ``DATADIR/repair-backup-<UTC timestamp>`` (we hold the lock: no race)."""
    return unique_path(datadir, BACKUP_PREFIX)


def unique_path(directory: str, prefix: str) -> str:
    """``directory/<prefix><UTC time>``, with a counter if that exists already."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    base = os.path.join(directory, prefix + stamp)
    path, n = base, 1
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _write_durably(fs: IFileSystem, path: str, data: bytes) -> None:
    fd = fs.create_exclusive(path)
    try:
        write_all(fs, fd, data)
        fs.fsync(fd)
    finally:
        fs.close(fd)


def _manifest(report: RepairReport) -> str:
    """What was removed from where, and how to put it back."""
    datadir = report.datadir

    def rel(path: str | None) -> str | None:
        return None if path is None else os.path.relpath(path, datadir)

    entries: list[dict[str, Any]] = []
    if report.truncated is not None:
        t = report.truncated
        entries.append({
            "action": "truncated",
            "path": rel(t.path),
            "original_size": t.original_size,
            "new_size": t.new_size,
            "backup": rel(t.backup),
            "restore": f"cat {rel(t.backup)} >> {rel(t.path)}",
        })
    for m in report.moved_snapshots + report.removed_segments:
        entries.append({
            "action": "moved",
            "path": rel(m.path),
            "size": m.size,
            "backup": rel(m.backup),
            "restore": f"mv {rel(m.backup)} {rel(m.path)}",
        })
    return json.dumps(
        {
            "tool": "python -m txjournal repair",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "created_unix": time.time(),
            "truncate_after": report.truncate_after,
            "entries": entries,
            "note": "paths are relative to the data directory; stop the service before restoring",
        },
        indent=2,
    ) + "\n"
