"""
Fault injection across every disk operation of the file journal: each
operation fails (EIO, ENOSPC, EMFILE) at each of its first calls during a
run that rolls segments over. Whatever fails, the service fail-stops, no
acknowledged command is lost on restart, and nothing unacknowledged is
invented beyond the batch whose outcome was reported unknown.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
from conftest import sync_runner
from twisted.internet.task import Clock

from examples.bank import Deposit, bank
from txjournal import JournalFailed, JournalService, JournalWriteError
from txjournal.fs import OSFileSystem

OPS = ["write", "fdatasync", "fsync", "create_exclusive", "open_append", "rename", "fsync_dir"]
ERRNOS = [errno.EIO, errno.ENOSPC, errno.EMFILE]
COMMANDS = 30


class CountingFS(OSFileSystem):
    """Fails the ``nth`` call of ``op`` (counting from 1), once armed."""

    def __init__(self, op: str | None = None, nth: int = 0, code: int = errno.EIO) -> None:
        self.op, self.nth, self.code = op, nth, code
        self.calls: dict[str, int] = {}
        self.fired = False

    def _count(self, op: str) -> None:
        n = self.calls[op] = self.calls.get(op, 0) + 1
        if op == self.op and n == self.nth:
            self.fired = True
            raise OSError(self.code, os.strerror(self.code))

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._count("write")
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        self._count("fdatasync")
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        self._count("fsync")
        super().fsync(fd)

    def create_exclusive(self, path: str) -> int:
        self._count("create_exclusive")
        return super().create_exclusive(path)

    def open_append(self, path: str) -> int:
        self._count("open_append")
        return super().open_append(path)

    def rename(self, src: str, dst: str) -> None:
        self._count("rename")
        super().rename(src, dst)

    def fsync_dir(self, path: str) -> None:
        self._count("fsync_dir")
        super().fsync_dir(path)


def run(datadir: str, fs: CountingFS) -> tuple[list[int], list[int], list[Any]]:
    """Execute COMMANDS deposits one at a time; return (acked, failed, errors)."""
    svc = JournalService(
        bank, datadir, fs=fs, runner=sync_runner, reactor=Clock(),
        segment_size=200, snapshot_on_stop=False,
    )
    svc.startService()
    acked: list[int] = []
    failed: list[int] = []
    errors: list[Any] = []
    for i in range(1, COMMANDS + 1):
        box: list[Any] = []
        svc.execute(Deposit("a", i)).addBoth(box.append)
        (outcome,) = box
        if isinstance(outcome, int):
            acked.append(i)
        else:
            failed.append(i)
            errors.append(outcome.value)
    assert svc.query("accounts").get("a", 0) == sum(acked)
    svc.stopService()
    return acked, failed, errors


def test_unfaulted_run_uses_every_operation(tmp_path: Any) -> None:
    fs = CountingFS()
    acked, _failed, _errors = run(str(tmp_path / "d"), fs)
    assert acked == list(range(1, COMMANDS + 1))
    # Enough rollovers happen for every operation to be hit several times.
    assert all(fs.calls.get(op, 0) >= 3 for op in OPS), fs.calls


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("op", OPS)
def test_fault_fail_stops_and_restart_keeps_every_ack(tmp_path: Any, op: str, code: int) -> None:
    cases = 0
    for nth in (1, 2, 3):
        datadir = str(tmp_path / f"{nth}")
        fs = CountingFS(op, nth, code)
        acked, failed, errors = run(datadir, fs)
        if not fs.fired:
            continue
        cases += 1
        # Fail-stop: the first failure is the write error naming the cause,
        # everything after it is refused, nothing after it is acknowledged.
        assert failed and acked == list(range(1, failed[0]))
        assert isinstance(errors[0], JournalWriteError) and not isinstance(errors[0], JournalFailed)
        assert os.strerror(code) in str(errors[0])
        if code == errno.ENOSPC:
            assert "disk is full" in str(errors[0])
        assert all(isinstance(e, JournalFailed) for e in errors[1:])
        # Restart: every acknowledged command is there; at most the batch
        # whose outcome was reported unknown may also be.
        svc = JournalService(bank, datadir, runner=sync_runner, reactor=Clock(), segment_size=200)
        svc.startService()
        balance = svc.query("accounts").get("a", 0)
        assert balance in (sum(acked), sum(acked) + failed[0])
        assert svc.engine.last_seq in (len(acked), len(acked) + 1)
        if op in ("create_exclusive", "rename"):
            # Only used to create a segment, before any byte of the batch.
            assert "were not written" in str(errors[0]), errors[0]
        if "were not written" in str(errors[0]):
            # A batch said not to be written must not come back on restart.
            assert (balance, svc.engine.last_seq) == (sum(acked), len(acked))
        else:
            assert "outcome of commands" in str(errors[0]), errors[0]
        box: list[Any] = []
        svc.execute(Deposit("a", 1000)).addBoth(box.append)
        assert box == [balance + 1000]
        svc.stopService()
    assert cases >= 2


class RefusingFS(OSFileSystem):
    """The journal's segments cannot be opened for appending (an immutable file)."""

    def open_append(self, path: str) -> int:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)


def test_a_tail_segment_that_cannot_be_written_stops_start_up(tmp_path: Any) -> None:
    datadir = str(tmp_path / "d")
    acked, _failed, _errors = run(datadir, CountingFS())
    svc = JournalService(
        bank, datadir, fs=RefusingFS(), runner=sync_runner, reactor=Clock(),
        segment_size=200, snapshot_on_stop=False,
    )
    # Refused at start, naming the file, not at the first command after
    # the service said it was ready.
    with pytest.raises(PermissionError) as raised:
        svc.startService()
    assert raised.value.filename is not None
    assert raised.value.filename.endswith(".log")
    assert os.path.dirname(raised.value.filename) == os.path.join(datadir, "journal")
    assert not svc.running
    again = JournalService(bank, datadir, runner=sync_runner, reactor=Clock(), snapshot_on_stop=False)
    again.startService()
    assert again.query("balance", account="a") == sum(acked)
    again.stopService()
