"""
Backend conformance: every :class:`IJournal` and :class:`ISnapshotStore`
implementation must pass the same tests, the in-memory ones being the
reference. The PostgreSQL backend runs against the server on this machine
(see ``tests/pg_support.py``) and fails, never skips, when it is down.

A backend enters through a fixture parameter: a function that takes the
test's ``tmp_path`` and returns a :class:`JournalBackend` or
:class:`SnapshotBackend`, whose ``reopen()`` gives a fresh object on the
*same* storage (for files: the same directory; for memory: the same
object, reopened). A later SQL backend adds one function to
:data:`JOURNAL_BACKENDS` or :data:`SNAPSHOT_BACKENDS` and nothing else.

Capabilities a backend may lack are declared, never silently skipped:
``can_tear`` says whether a write can be cut short by a crash (the memory
backend never crashes half-way, so it declares it cannot, and a test
checks that declaration).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pg_support import PG_DSN, drop_tables, require_pg, unique_prefix
from zope.interface.verify import verifyObject

from txjournal import record as rec
from txjournal.errors import SnapshotError
from txjournal.interfaces import IJournal, ISnapshotStore
from txjournal.journal.file import FileJournal
from txjournal.journal.memory import MemoryJournal, MemorySnapshotStore
from txjournal.journal.postgres import PostgresJournal
from txjournal.journal.sqlite import SQLiteJournal
from txjournal.snapshot.file import FileSnapshotStore

pytestmark = pytest.mark.timeout(60)


# -- backends -----------------------------------------------------------------------


@dataclass
class JournalBackend:
    """
    How the suite reaches one journal implementation.

    :ivar reopen: close the previous journal object (if any) and return a
        new one on the same storage, already ``open()``-ed but not replayed.
    :ivar tear: if the backend can be torn, write ``data`` (a partial
        record) at the very end of its storage, as a crash mid-write would.
    :ivar can_tear: whether ``tear`` exists; see the module docstring.
    :ivar cleanup: called after the test (close connections, drop tables).
    """

    name: str
    reopen: Callable[[], Any]
    can_tear: bool
    tear: Callable[[bytes], None] | None = None
    cleanup: Callable[[], None] | None = None


def file_journal(tmp_path: Path, segment_size: int = 1 << 20) -> JournalBackend:
    directory = tmp_path / "journal"
    current: list[FileJournal] = []

    def reopen() -> FileJournal:
        if current:
            current.pop().close()
        journal = FileJournal(str(directory), segment_size=segment_size, sync=False)
        journal.open()
        current.append(journal)
        return journal

    def tear(data: bytes) -> None:
        last = sorted(p for p in directory.iterdir() if p.name.endswith(".log"))[-1]
        with open(last, "ab") as f:
            f.write(data)

    return JournalBackend("file", reopen, can_tear=True, tear=tear)


def file_journal_small_segments(tmp_path: Path) -> JournalBackend:
    """The file journal rolling over every couple of records: segment boundaries everywhere."""
    backend = file_journal(tmp_path, segment_size=rec.SEGMENT_HEADER_SIZE + 64)
    backend.name = "file-small-segments"
    return backend


def memory_journal(tmp_path: Path) -> JournalBackend:
    journal = MemoryJournal()

    def reopen() -> MemoryJournal:
        journal.close()
        journal.open()
        return journal

    return JournalBackend("memory", reopen, can_tear=False)


def _reopener(make: Callable[[], Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    """``reopen`` and ``cleanup`` for a backend whose objects hold a connection."""
    current: list[Any] = []

    def reopen() -> Any:
        close()
        journal = make()
        journal.open()
        current.append(journal)
        return journal

    def close() -> None:
        while current:
            current.pop().close()

    return reopen, close


def sqlite_journal(tmp_path: Path) -> JournalBackend:
    """
    SQLite cannot be torn: a batch is one transaction, and a transaction
    interrupted by a crash is rolled back from the WAL, never half-kept.
    """
    path = str(tmp_path / "db" / "journal.sqlite")
    reopen, close = _reopener(lambda: SQLiteJournal(path, sync=False))
    return JournalBackend("sqlite", reopen, can_tear=False, cleanup=close)


def postgres_journal(tmp_path: Path) -> JournalBackend:
    """PostgreSQL, in tables of a prefix of its own; cannot be torn, as SQLite."""
    require_pg()
    prefix = unique_prefix()
    reopen, close = _reopener(lambda: PostgresJournal(PG_DSN, table_prefix=prefix, sync=False))

    def cleanup() -> None:
        close()
        drop_tables(prefix)

    return JournalBackend("postgres", reopen, can_tear=False, cleanup=cleanup)


JOURNAL_BACKENDS: list[Callable[[Path], JournalBackend]] = [
    file_journal,
    file_journal_small_segments,
    memory_journal,
    sqlite_journal,
    postgres_journal,
]


@dataclass
class SnapshotBackend:
    name: str
    reopen: Callable[[], Any]
    cleanup: Callable[[], None] | None = None


def file_snapshots(tmp_path: Path) -> SnapshotBackend:
    directory = str(tmp_path / "snapshots")
    return SnapshotBackend("file", lambda: FileSnapshotStore(directory))


def memory_snapshots(tmp_path: Path) -> SnapshotBackend:
    store = MemorySnapshotStore()
    return SnapshotBackend("memory", lambda: store)


def _store_reopener(make: Callable[[], Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    """``reopen`` and ``cleanup`` for a snapshot store holding a connection."""
    current: list[Any] = []

    def reopen() -> Any:
        close()
        current.append(make())
        return current[-1]

    def close() -> None:
        while current:
            current.pop().close()

    return reopen, close


def sqlite_snapshots(tmp_path: Path) -> SnapshotBackend:
    from txjournal.snapshot.sqlite import SQLiteSnapshotStore

    path = str(tmp_path / "db" / "snapshots.sqlite")
    reopen, close = _store_reopener(lambda: SQLiteSnapshotStore(path))
    return SnapshotBackend("sqlite", reopen, cleanup=close)


def postgres_snapshots(tmp_path: Path) -> SnapshotBackend:
    """PostgreSQL, in a table of a prefix of its own, dropped afterwards."""
    from txjournal.snapshot.postgres import PostgresSnapshotStore

    require_pg()
    prefix = unique_prefix()
    reopen, close = _store_reopener(lambda: PostgresSnapshotStore(PG_DSN, table_prefix=prefix))

    def cleanup() -> None:
        from pg_support import sql

        close()
        sql(f"DROP TABLE IF EXISTS {prefix}_snapshots")

    return SnapshotBackend("postgres", reopen, cleanup=cleanup)


SNAPSHOT_BACKENDS: list[Callable[[Path], SnapshotBackend]] = [
    file_snapshots,
    memory_snapshots,
    sqlite_snapshots,
    postgres_snapshots,
]


@pytest.fixture(params=JOURNAL_BACKENDS, ids=lambda f: f.__name__)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JournalBackend]:
    made: JournalBackend = request.param(tmp_path)
    yield made
    if made.cleanup is not None:
        made.cleanup()


#: Backends whose writes a crash can cut short (the others commit a batch as
#: one transaction); the torn-tail test runs on exactly these, so nothing is
#: skipped, and test_tear_capability_is_declared keeps the list honest.
TEARABLE_BACKENDS = [f for f in JOURNAL_BACKENDS if f in (file_journal, file_journal_small_segments)]


@pytest.fixture(params=TEARABLE_BACKENDS, ids=lambda f: f.__name__)
def tearable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JournalBackend]:
    made: JournalBackend = request.param(tmp_path)
    yield made
    if made.cleanup is not None:
        made.cleanup()


@pytest.fixture(params=SNAPSHOT_BACKENDS, ids=lambda f: f.__name__)
def snapshots(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotBackend]:
    made: SnapshotBackend = request.param(tmp_path)
    yield made
    if made.cleanup is not None:
        made.cleanup()


# -- helpers ------------------------------------------------------------------------


def encoded(salt: bytes, seq: int, tag: str = "") -> bytes:
    """A record whose fields say which seq it is, so mix-ups are visible."""
    import msgpack

    fields = msgpack.packb({"seq": seq, "tag": tag, "pad": "x" * (seq % 7)}, use_bin_type=True)
    user = b"u%d" % seq if seq % 2 else b""
    return rec.encode_record(salt, seq, 1_000 + seq, b"cmd%d" % (seq % 3), 1 + seq % 2, fields, user)


def fresh(backend: JournalBackend) -> Any:
    """A reopened journal, replayed to its end (the life cycle start-up follows)."""
    journal = backend.reopen()
    list(journal.replay(1))
    return journal


def append(journal: Any, count: int, batch: int = 1, tag: str = "") -> list[bytes]:
    """Append ``count`` records in batches of ``batch``; return each record's bytes."""
    out: list[bytes] = []
    while len(out) < count:
        n = min(batch, count - len(out))
        first = journal.next_seq
        chunk = [encoded(journal.salt, s, tag) for s in range(first, first + n)]
        journal.append(b"".join(chunk), first, first + n - 1)
        out.extend(chunk)
    return out


def decoded(salt: bytes, data: bytes) -> rec.Record:
    record, end = rec.decode_at(data, 0, salt)
    assert end == len(data)
    return record


# -- journal conformance ------------------------------------------------------------


def test_provides_the_interface(backend: JournalBackend) -> None:
    assert verifyObject(IJournal, backend.reopen())


def test_location_names_the_storage(backend: JournalBackend) -> None:
    """Error messages name where a journal lives; every backend must say."""
    location = backend.reopen().location
    assert isinstance(location, str) and location


def test_empty_journal(backend: JournalBackend) -> None:
    journal = backend.reopen()
    assert list(journal.replay(1)) == []
    assert journal.next_seq == 1
    assert isinstance(journal.journal_id, int) and 0 <= journal.journal_id < 2**64
    assert journal.salt == journal.journal_id.to_bytes(8, "little")


def test_records_come_back_in_order_and_exact(backend: JournalBackend) -> None:
    journal = fresh(backend)
    salt = journal.salt
    written = append(journal, 5) + append(journal, 7, batch=3) + append(journal, 4, batch=4)
    assert journal.next_seq == 17
    again = backend.reopen()
    records = list(again.replay(1))
    assert records == [decoded(salt, data) for data in written]
    assert [r.seq for r in records] == list(range(1, 17))
    assert again.next_seq == 17


def test_append_refuses_a_wrong_first_seq(backend: JournalBackend) -> None:
    """Sequence numbers are dense and never reused: a gap or a repeat is refused, writing nothing."""
    journal = fresh(backend)
    append(journal, 3)
    for wrong in (5, 3, 1):
        with pytest.raises(ValueError, match="expects 4"):
            journal.append(encoded(journal.salt, wrong), wrong, wrong)
    assert journal.next_seq == 4
    append(journal, 1)
    assert [r.seq for r in backend.reopen().replay(1)] == [1, 2, 3, 4]


@pytest.mark.parametrize("from_seq", [1, 2, 7, 12, 13, 14])
def test_replay_from_seq_yields_exactly_the_later_records(backend: JournalBackend, from_seq: int) -> None:
    journal = fresh(backend)
    append(journal, 13, batch=2)
    again = backend.reopen()
    assert [r.seq for r in again.replay(from_seq)] == list(range(from_seq, 14))
    assert again.next_seq == 14


def test_a_batch_is_all_there_after_reopen(backend: JournalBackend) -> None:
    journal = fresh(backend)
    append(journal, 2)
    batch = append(journal, 9, batch=9, tag="batch")
    records = list(backend.reopen().replay(3))
    assert records == [decoded(journal.salt, d) for d in batch]


def test_durable_and_appendable_across_reopens(backend: JournalBackend) -> None:
    """
    Each reopen continues at the right sequence number with the same
    identity. (Identity is fixed by the first append: an empty file journal
    may pick a new one at each open, as nothing was recorded under it.)
    """
    journal = fresh(backend)
    written = append(journal, 1, tag="first")
    identity = (journal.journal_id, journal.salt)
    for round_ in range(4):
        journal = fresh(backend)
        assert (journal.journal_id, journal.salt) == identity
        assert journal.next_seq == len(written) + 1
        written += append(journal, round_ + 1, batch=2, tag=f"r{round_}")
    journal = backend.reopen()
    assert list(journal.replay(1)) == [decoded(identity[1], d) for d in written]
    assert (journal.journal_id, journal.salt) == identity


def test_records_verify_only_under_the_journal_salt(backend: JournalBackend) -> None:
    journal = fresh(backend)
    (data,) = append(journal, 1)
    other = (journal.journal_id ^ 1).to_bytes(8, "little")
    with pytest.raises(rec.RecordError, match="checksum"):
        rec.decode_at(data, 0, other)


def test_prune_never_loses_later_records(backend: JournalBackend) -> None:
    """
    ``prune(upto)`` may drop what it can of records ``<= upto`` (the memory
    backend drops nothing, small file segments drop a lot) but replay from
    any later sequence number is unchanged, and appending goes on.
    """
    journal = fresh(backend)
    written = append(journal, 20, batch=3)
    removed = journal.prune(10)
    assert isinstance(removed, list)
    again = backend.reopen()
    assert list(again.replay(11)) == [decoded(journal.salt, d) for d in written[10:]]
    assert again.next_seq == 21
    more = append(again, 2)
    assert list(backend.reopen().replay(11)) == [decoded(journal.salt, d) for d in written[10:] + more]
    if backend.name == "file-small-segments":
        assert removed  # there was something to drop


def test_tear_capability_is_declared(backend: JournalBackend, request: pytest.FixtureRequest) -> None:
    """Every backend that can be torn is in TEARABLE_BACKENDS, so none escapes the torn-tail test."""
    assert (backend.tear is not None) == backend.can_tear
    factory = request.node.callspec.params["backend"]
    assert backend.can_tear == (factory in TEARABLE_BACKENDS)
    if backend.name in ("memory", "sqlite", "postgres"):
        assert not backend.can_tear  # nothing reaches it half-written: a batch is one transaction


def test_torn_tail_is_cut_and_appending_goes_on(tearable: JournalBackend) -> None:
    backend = tearable
    assert backend.tear is not None
    journal = fresh(backend)
    written = append(journal, 6, batch=2)
    partial = encoded(journal.salt, 7)
    for cut in (1, rec.PREFIX_SIZE, len(partial) // 2, len(partial) - 1):
        backend.tear(partial[:cut])
        journal = backend.reopen()
        assert list(journal.replay(1)) == [decoded(journal.salt, d) for d in written], cut
        assert journal.next_seq == 7, cut
    # After the cut, appends land right after the last good record.
    written += append(journal, 2)
    journal = backend.reopen()
    assert [r.seq for r in journal.replay(1)] == list(range(1, 9))
    assert list(journal.replay(1)) == [decoded(journal.salt, d) for d in written]


# -- snapshot store conformance -----------------------------------------------------


def test_snapshot_store_provides_the_interface(snapshots: SnapshotBackend) -> None:
    assert verifyObject(ISnapshotStore, snapshots.reopen())


def test_snapshot_store_location_names_the_storage(snapshots: SnapshotBackend) -> None:
    location = snapshots.reopen().location
    assert isinstance(location, str) and location


def test_snapshots_save_list_load(snapshots: SnapshotBackend) -> None:
    store = snapshots.reopen()
    assert store.list() == []
    payloads = {seq: b"model at %d " % seq * seq for seq in (5, 1, 12, 7)}
    for seq, payload in payloads.items():
        where = store.save(seq, payload)
        assert isinstance(where, str) and where
    again = snapshots.reopen()
    assert again.list() == [12, 7, 5, 1]  # newest first
    for seq, payload in payloads.items():
        assert again.load(seq) == payload
    assert again.load(1) == payloads[1]
    # Saving the same seq again replaces it.
    again.save(7, b"replaced")
    assert snapshots.reopen().load(7) == b"replaced"
    assert snapshots.reopen().list() == [12, 7, 5, 1]


def test_snapshot_payloads_of_any_size(snapshots: SnapshotBackend) -> None:
    store = snapshots.reopen()
    big = os.urandom(3 * 1024 * 1024 + 17)
    store.save(2, b"")
    store.save(3, big)
    again = snapshots.reopen()
    assert again.load(2) == b"" and again.load(3) == big


def test_snapshot_load_of_a_missing_seq_raises(snapshots: SnapshotBackend) -> None:
    store = snapshots.reopen()
    store.save(4, b"four")
    for missing in (3, 5, 0):
        with pytest.raises(SnapshotError, match=str(missing)):
            store.load(missing)


def test_snapshot_prune_keeps_the_newest(snapshots: SnapshotBackend) -> None:
    store = snapshots.reopen()
    for seq in (3, 9, 1, 6, 12):
        store.save(seq, b"s%d" % seq)
    assert store.prune(3) == [3, 1]
    again = snapshots.reopen()
    assert again.list() == [12, 9, 6]
    assert again.prune(5) == []
    assert again.prune(1) == [9, 6]
    assert snapshots.reopen().list() == [12]
    assert snapshots.reopen().load(12) == b"s12"
    with pytest.raises(SnapshotError):
        snapshots.reopen().load(9)


def test_snapshot_prune_refuses_to_keep_none(snapshots: SnapshotBackend) -> None:
    """The service always keeps at least one snapshot; a store must not silently delete all."""
    store = snapshots.reopen()
    store.save(1, b"only")
    with pytest.raises(ValueError, match="at least one"):
        store.prune(0)
    assert snapshots.reopen().list() == [1]
