"""
JournalService on real files, a real reactor and the real writer thread,
with faults injected through the file-system seam.
"""

from __future__ import annotations

import errno
import os
import pickle
import stat
import threading
from typing import Any

import pytest
import pytest_twisted
from conftest import texts

from examples.bank import Deposit, Withdraw, bank
from txjournal import (
    DataDirLocked,
    JournalCorrupt,
    JournalFailed,
    JournalService,
    JournalWriteError,
)
from txjournal.errors import SnapshotError, UnsafeDataDir
from txjournal.fs import OSFileSystem
from txjournal.journal.file import FileJournal, segment_name

pytestmark = pytest.mark.timeout(60)


class FaultyFS(OSFileSystem):
    """Real file system, plus faults armed by the test."""

    def __init__(self) -> None:
        self.fail: dict[str, OSError] = {}
        self.short_write: int | None = None  # bytes to write before ENOSPC
        self.threads: set[str] = set()

    def _maybe_fail(self, op: str) -> None:
        err = self.fail.get(op)
        if err is not None:
            raise err

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self.threads.add(threading.current_thread().name)
        self._maybe_fail("write")
        if self.short_write is not None:
            n, self.short_write = self.short_write, None
            written = os.write(fd, bytes(data[:n]))
            self.fail["write"] = OSError(errno.ENOSPC, "No space left on device")
            return written
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        self.threads.add(threading.current_thread().name)
        self._maybe_fail("fdatasync")
        super().fdatasync(fd)

    def rename(self, src: str, dst: str) -> None:
        self._maybe_fail("rename")
        super().rename(src, dst)


def start(datadir: str, **kw: Any) -> JournalService[Any]:
    svc = JournalService(bank, datadir, **kw)
    svc.startService()
    return svc


@pytest_twisted.ensureDeferred
async def test_durable_across_restart_with_dense_seqs(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False)
    results = [await svc.execute(Deposit("alice", i)) for i in range(1, 6)]
    assert results == [1, 3, 6, 10, 15]
    await svc.stopService()
    again = start(datadir)
    assert again.replayed == 5
    assert again.query("balance", account="alice") == 15
    assert await again.execute(Deposit("alice", 1)) == 16
    await again.stopService()
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    assert [r.seq for r in journal.replay()] == [1, 2, 3, 4, 5, 6]


@pytest_twisted.ensureDeferred
async def test_files_are_private_and_writes_leave_the_reactor_thread(tmp_path: Any) -> None:
    fs = FaultyFS()
    datadir = str(tmp_path / "bank")
    svc = start(datadir, fs=fs)
    await svc.execute(Deposit("a", 1))
    await svc.snapshot()
    await svc.stopService()
    assert fs.threads and threading.current_thread().name not in fs.threads
    for root, _dirs, files in os.walk(datadir):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
            assert mode == 0o600, (name, oct(mode))


@pytest_twisted.ensureDeferred
async def test_second_owner_is_refused_naming_holder(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir)
    with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}"):
        start(datadir)
    # The refused service changed nothing: the owner keeps working.
    assert await svc.execute(Deposit("a", 1)) == 1
    await svc.stopService()
    again = start(datadir)
    assert again.query("balance", account="a") == 1
    await again.stopService()


def test_datadir_writable_by_others_is_refused(tmp_path: Any) -> None:
    datadir = tmp_path / "bank"
    datadir.mkdir()
    datadir.chmod(0o777)
    with pytest.raises(UnsafeDataDir, match="writable by other users"):
        start(str(datadir))


def _write_segment(datadir: str, content: bytes) -> str:
    os.makedirs(os.path.join(datadir, "journal"), mode=0o700)
    path = os.path.join(datadir, "journal", segment_name(1))
    with open(path, "wb") as f:
        f.write(content)
    return path


@pytest.mark.parametrize("content", [b"", b"this is not a journal at all" * 3])
def test_garbage_or_empty_segment_refuses_start(tmp_path: Any, content: bytes) -> None:
    datadir = str(tmp_path / "bank")
    path = _write_segment(datadir, content)
    with pytest.raises(JournalCorrupt, match="bad segment header") as info:
        start(datadir)
    assert info.value.path == path
    assert "verify" in str(info.value)
    # Nothing was touched and the lock was released.
    with open(path, "rb") as f:
        assert f.read() == content
    with pytest.raises(JournalCorrupt):
        start(datadir)


@pytest_twisted.ensureDeferred
async def test_torn_tail_is_cut_with_warning(tmp_path: Any, captured: list[Any]) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False)
    for _ in range(3):
        await svc.execute(Deposit("a", 1))
    await svc.stopService()
    path = os.path.join(datadir, "journal", segment_name(1))
    good = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\x30\x00\x00\x00\x11\x22")  # a record that never finished
    again = start(datadir)
    assert again.query("balance", account="a") == 3
    assert os.path.getsize(path) == good
    assert "torn write" in texts(captured) and path in texts(captured)
    assert await again.execute(Deposit("a", 1)) == 4
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_damage_followed_by_valid_records_refuses(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False)
    for _ in range(3):
        await svc.execute(Deposit("a", 1))
    await svc.stopService()
    path = os.path.join(datadir, "journal", segment_name(1))
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    list(journal.replay())
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        # Flip a byte in the fields of the second record.
        offset = 32 + (len(data) - 32) // 3 + 30
        data[offset] ^= 0xFF
        f.seek(0)
        f.write(data)
    with pytest.raises(JournalCorrupt) as info:
        start(datadir)
    e = info.value
    assert e.path == path and e.seq == 2 and "followed by valid data" in str(e)
    assert f"offset {e.offset}" in str(e)


@pytest_twisted.ensureDeferred
async def test_garbage_and_unloadable_snapshots_fall_back(tmp_path: Any, captured: list[Any]) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False)
    await svc.execute(Deposit("a", 1))
    await svc.snapshot()
    await svc.execute(Deposit("a", 2))
    await svc.snapshot()
    await svc.execute(Deposit("a", 4))
    await svc.stopService()
    snapdir = os.path.join(datadir, "snapshots")
    newest = os.path.join(snapdir, sorted(os.listdir(snapdir))[-1])
    with open(newest, "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    again = start(datadir, snapshot_on_stop=False)
    assert again.loaded_snapshot_seq == 1
    assert again.query("balance", account="a") == 7
    assert newest in texts(captured)
    await again.stopService()


class Renamed:
    """Stands for a model class that a later version of the code renamed."""


@pytest_twisted.ensureDeferred
async def test_snapshot_of_a_renamed_class_is_skipped(
    tmp_path: Any, captured: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from txjournal.snapshot.file import FileSnapshotStore

    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False)
    await svc.execute(Deposit("a", 1))
    await svc.stopService()
    store = FileSnapshotStore(os.path.join(datadir, "snapshots"))
    stale = pickle.dumps(Renamed())
    store.save(1, stale)
    monkeypatch.delattr(__import__(__name__), "Renamed")
    # Skipped with a warning naming the reason; the journal rebuilds the model.
    again = start(datadir, snapshot_on_stop=False)
    assert again.loaded_snapshot_seq == 0
    assert again.query("balance", account="a") == 1
    assert "Renamed" in texts(captured)
    await again.stopService()
    # A snapshot beyond the end of the journal proves records are missing:
    # refuse rather than start from less.
    store.save(5, stale)
    with pytest.raises(Exception, match=r"snapshot 5 in \S+ covers more and cannot be loaded"):
        start(datadir)


@pytest_twisted.ensureDeferred
async def test_fsync_failure_fail_stops_and_restart_recovers(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    fs = FaultyFS()
    svc = start(datadir, fs=fs, snapshot_on_stop=False)
    assert await svc.execute(Deposit("a", 10)) == 10
    fs.fail["fdatasync"] = OSError(errno.EIO, "Input/output error")
    with pytest.raises(JournalWriteError, match="Input/output error"):
        await svc.execute(Deposit("a", 1))
    with pytest.raises(JournalFailed, match="restart"):
        await svc.execute(Deposit("a", 1))
    assert svc.query("balance", account="a") == 10
    await svc.stopService()
    # The failed record reached the page cache, so it may or may not be in
    # the journal; either way the restarted model matches the journal.
    again = start(datadir)
    assert again.query("balance", account="a") in (10, 11)
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_disk_full_mid_record_is_dropped_on_restart(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    fs = FaultyFS()
    svc = start(datadir, fs=fs, snapshot_on_stop=False)
    assert await svc.execute(Deposit("a", 10)) == 10
    fs.short_write = 7
    with pytest.raises(JournalWriteError, match="disk is full"):
        await svc.execute(Deposit("a", 5))
    assert svc.query("balance", account="a") == 10
    await svc.stopService()
    again = start(datadir)
    assert again.query("balance", account="a") == 10
    assert await again.execute(Withdraw("a", 1)) == 9
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_snapshot_failure_leaves_journal_and_old_snapshots(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    fs = FaultyFS()
    svc = start(datadir, fs=fs, snapshot_on_stop=False)
    await svc.execute(Deposit("a", 1))
    assert await svc.snapshot() == 1
    await svc.execute(Deposit("a", 1))
    fs.fail["rename"] = OSError(errno.EIO, "Input/output error")
    with pytest.raises(Exception, match="snapshot at 2"):
        await svc.snapshot()
    del fs.fail["rename"]
    assert await svc.execute(Deposit("a", 1)) == 3
    assert os.listdir(os.path.join(datadir, "snapshots")) == ["00000000000000000001.snapshot"]
    await svc.stopService()
    again = start(datadir)
    assert again.loaded_snapshot_seq == 1
    assert again.query("balance", account="a") == 3
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_many_concurrent_callers_share_syncs(tmp_path: Any) -> None:
    from twisted.internet.defer import gatherResults

    svc = start(str(tmp_path / "bank"))
    results = await gatherResults([svc.execute(Deposit("a", 1)) for _ in range(2000)])
    assert sorted(results) == list(range(1, 2001))
    assert svc.engine.batches < 2000
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_segments_roll_over_and_prune_only_when_asked(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    journal_dir = os.path.join(datadir, "journal")
    svc = start(datadir, segment_size=300, snapshot_on_stop=False)
    for _ in range(40):
        await svc.execute(Deposit("a", 1))
    await svc.snapshot()
    segments = sorted(os.listdir(journal_dir))
    assert len(segments) > 5  # kept by default: full history
    await svc.stopService()
    again = start(datadir, segment_size=300, prune_segments=True, keep_snapshots=1, snapshot_on_stop=False)
    for _ in range(10):
        await again.execute(Deposit("a", 1))
    assert await again.snapshot() == 50
    remaining = sorted(os.listdir(journal_dir))
    assert len(remaining) < len(segments)
    first_kept = int(remaining[0].split(".")[0])
    assert first_kept <= 51
    await again.execute(Deposit("a", 1))
    await again.stopService()
    third = start(datadir, segment_size=300)
    assert third.query("balance", account="a") == 51
    await third.stopService()
    # Without its snapshot the pruned journal cannot rebuild the model: refuse, naming the gap.
    for name in os.listdir(os.path.join(datadir, "snapshots")):
        os.unlink(os.path.join(datadir, "snapshots", name))
    with pytest.raises(JournalCorrupt, match="missing"):
        start(datadir)


class _KillingSerializer:
    """Dies in the middle of serializing (in the forked child, where it runs)."""

    def dumps(self, model: object) -> bytes:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    def loads(self, data: bytes) -> object:
        return pickle.loads(data)


@pytest_twisted.ensureDeferred
async def test_forked_snapshot_covers_exactly_its_sequence_number(tmp_path: Any, captured: list[Any]) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False)
    for _ in range(100):
        await svc.execute(Deposit("a", 1))
    snapshot = svc.snapshot()
    # Commands applied while the child writes do not leak into its snapshot.
    for _ in range(10):
        await svc.execute(Deposit("a", 1))
    assert await snapshot == 100
    assert "forked child" in texts(captured)
    await svc.stopService()
    again = start(datadir, snapshot_on_stop=False)
    assert (again.loaded_snapshot_seq, again.replayed) == (100, 10)
    assert again.query("balance", account="a") == 110
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_snapshot_child_killed_leaves_older_snapshots(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False)
    await svc.execute(Deposit("a", 1))
    assert await svc.snapshot() == 1
    await svc.execute(Deposit("a", 1))
    svc.serializer = _KillingSerializer()
    with pytest.raises(SnapshotError, match="killed by signal 9"):
        await svc.snapshot()
    assert await svc.execute(Deposit("a", 1)) == 3
    await svc.stopService()
    assert sorted(os.listdir(os.path.join(datadir, "snapshots"))) == ["00000000000000000001.snapshot"]


def test_long_replay_reports_progress(tmp_path: Any, captured: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import sync_runner
    from twisted.internet.task import Clock

    from txjournal import service as service_module

    datadir = str(tmp_path / "bank")
    svc = JournalService(bank, datadir, sync=False, runner=sync_runner, reactor=Clock(),
                         snapshot_on_stop=False, segment_size=64 * 1024)
    svc.startService()
    for _ in range(8192 * 2):
        svc.execute(Deposit("a", 1))
    svc.stopService()
    monkeypatch.setattr(service_module, "_PROGRESS_EVERY", 0.0)
    again = JournalService(bank, datadir, runner=sync_runner, reactor=Clock())
    again.startService()
    lines = [line for line in texts(captured).splitlines() if line.startswith("Replaying:")]
    assert len(lines) == 2
    assert "8192 records done" in lines[0] and "%" in lines[0] and "left" in lines[0]
    assert again.query("balance", account="a") == 8192 * 2
    again.stopService()


@pytest_twisted.ensureDeferred
async def test_damaged_last_record_is_kept_aside_or_refused_under_a_snapshot(
    tmp_path: Any, captured: list[Any]
) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False)
    for _ in range(3):
        await svc.execute(Deposit("a", 1))
    await svc.stopService()
    path = os.path.join(datadir, "journal", segment_name(1))
    original = open(path, "rb").read()
    damaged = bytearray(original)
    damaged[-3] ^= 0xFF  # inside the last, complete record
    with open(path, "wb") as f:
        f.write(damaged)
    # No snapshot covers it: cut off like a torn write, but its bytes are kept
    # and the operator is told it may have been acknowledged.
    again = start(datadir, snapshot_on_stop=False)
    assert again.query("balance", account="a") == 2
    aside = [n for n in os.listdir(os.path.join(datadir, "journal")) if ".damaged-tail-" in n]
    assert len(aside) == 1
    offset = int(aside[0].rsplit("-", 1)[1])
    with open(os.path.join(datadir, "journal", aside[0]), "rb") as f:
        assert f.read() == bytes(damaged[offset:])
    assert os.path.getsize(path) == offset
    assert "may have been acknowledged" in texts(captured)
    await again.execute(Deposit("a", 1))
    assert await again.snapshot() == 3
    await again.stopService()
    # Under a snapshot, the record was certainly acknowledged: refuse, cut nothing.
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-3] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(JournalCorrupt, match="a snapshot covers sequence number 3"):
        start(datadir)
    assert os.path.getsize(path) == len(data)


def test_lock_holder_note_is_best_effort(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from txjournal.lock import DataDirLock

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    lock = DataDirLock(str(tmp_path))
    lock.acquire()  # a full disk must not stop the restart that recovers the journal
    other = DataDirLock(str(tmp_path))
    with pytest.raises(DataDirLocked):
        other.acquire()
    lock.release()
    other.acquire()
    other.release()


@pytest.mark.parametrize("make_bad", ["datadir_is_file", "lock_is_dir"])
def test_unusable_datadir_gives_a_clear_error(tmp_path: Any, make_bad: str) -> None:
    datadir = tmp_path / "bank"
    if make_bad == "datadir_is_file":
        datadir.write_text("not a directory")
        match = "is not a directory"
    else:
        datadir.mkdir(mode=0o700)
        (datadir / "LOCK").mkdir()
        match = "cannot be opened"
    with pytest.raises(UnsafeDataDir, match=match):
        start(str(datadir))


@pytest_twisted.ensureDeferred
async def test_stopping_during_a_snapshot_lets_it_finish(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=False, prune_segments=True, segment_size=300)
    for _ in range(30):
        await svc.execute(Deposit("a", 1))
    snapshot = svc.snapshot()
    await svc.stopService()
    assert await snapshot == 30
    # Its pruning ran too, on the writer thread, before that thread stopped.
    assert len(os.listdir(os.path.join(datadir, "journal"))) == 1


@pytest_twisted.ensureDeferred
async def test_damage_at_the_same_offset_twice_keeps_both_copies(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    path = os.path.join(datadir, "journal", segment_name(1))
    svc = start(datadir, snapshot_on_stop=False)
    await svc.execute(Deposit("a", 1))
    await svc.execute(Deposit("a", 1))
    await svc.stopService()
    for round_no in (1, 2):
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            data[-3] ^= 0xFF
            f.seek(0)
            f.write(data)
        again = start(datadir, snapshot_on_stop=False)
        assert again.query("balance", account="a") == 1
        await again.execute(Deposit("a", 1))  # rewrites the same offset
        await again.stopService()
        aside = [n for n in os.listdir(os.path.join(datadir, "journal")) if ".damaged-tail-" in n]
        assert len(aside) == round_no
