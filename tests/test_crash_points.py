"""
Exhaustive crash points: for every byte offset at which a crash could have
cut a write short, rebuild that state on disk, start a service on it and
check what it recovers.

A journal is written by the real service with :class:`ManualRunner`
standing in for the writer thread, so the test decides which commands form
one batch (one ``write``, one ``fdatasync``) and knows which commands were
acknowledged before it. A crash during a batch can leave any prefix of the
batch's bytes on disk (with ``fdatasync`` not yet returned, nothing of it
was acknowledged). Recovery must give exactly the model after the records
wholly on disk: never less than what was acknowledged, never a record that
is only partly there.

The same for a segment rollover (the old segment's last batch, the new
segment's ``.tmp-`` header, the renamed segment with only its header and
with part of its first batch) and for a snapshot write (a ``.tmp-``
snapshot cut at every offset; a snapshot under its final name cut at a
sample of offsets, which start-up must skip for the older one).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bankjournal import START_TIME, files_of, materialize, start_bank, stop
from conftest import ManualRunner
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from examples.bank import Bank, Deposit, Transfer, Withdraw
from txjournal import JournalService
from txjournal import record as rec
from txjournal.journal.file import segment_name
from txjournal.snapshot.file import HEADER_SIZE as SNAPSHOT_HEADER_SIZE
from txjournal.snapshot.file import snapshot_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Writer:
    """
    A service on ``datadir`` driven by hand: :meth:`batch` executes commands
    that form exactly one journal write, and the live model after every
    command is kept, indexed by sequence number.
    """

    def __init__(self, datadir: Path, segment_size: int) -> None:
        self.datadir = datadir
        self.runner = ManualRunner()
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.svc: JournalService[Bank] = start_bank(
            datadir, runner=self.runner, clock=self.clock, segment_size=segment_size
        )
        self.models: list[Bank] = [Bank()]
        self.acked = 0

    def _execute(self, command: object) -> Deferred[Any]:
        self.clock.advance(1.0)
        d = self.svc.execute(command)
        seq = len(self.models)
        self.models.append(Bank())  # placeholder until applied

        def applied(result: object) -> None:
            # Runs right after this command is applied and before the next one.
            self.models[seq] = copy.deepcopy(self.svc.model)
            self.acked = seq

        d.addBoth(applied)
        return d

    def single(self, command: object) -> None:
        d = self._execute(command)
        self.runner.release()
        assert d.called and not self.runner.calls

    def lead_and_batch(self, lead: object, batch: list[object]) -> tuple[int, int, int]:
        """
        Execute ``lead`` (written alone: no flush was in flight) and then
        ``batch``, which waits for the lead's flush and so becomes one write.
        Returns ``(first seq, last seq, bytes)`` of the batch's write.
        """
        lead_d = self._execute(lead)
        ds = [self._execute(c) for c in batch]
        self.runner.release()  # the lead: written, acknowledged; the batch goes to the writer
        assert lead_d.called and not any(d.called for d in ds)
        ((f, args, _d),) = self.runner.calls
        data, first, last = args
        assert f == self.svc.engine._journal.append
        assert (first, last) == (self.acked + 1, self.acked + len(batch))
        self.runner.release()
        assert all(d.called for d in ds)
        return first, last, len(data)

    def snapshot(self) -> int:
        d = self.svc.snapshot()
        self.runner.release_all()
        out: list[int] = []
        d.addCallback(out.append)
        assert out
        return out[0]

    def close(self) -> None:
        d = self.svc.stopService()
        self.runner.release_all()
        assert d.called


def deposits(n: int, account: str = "alice", base: int = 1) -> list[object]:
    return [Deposit(account, base + i) for i in range(n)]


MIXED: list[object] = [
    Deposit("bob", 30), Transfer("alice", "bob", 2), Withdraw("bob", 1000), Deposit("carol", 7),
]


def record_ends(data: bytes, start: int = rec.SEGMENT_HEADER_SIZE) -> list[tuple[int, int]]:
    """``(end offset, seq)`` of every record of a segment's bytes."""
    salt = rec.decode_segment_header(data).salt_bytes
    out = []
    offset = start
    while offset < len(data):
        record, offset = rec.decode_at(data, offset, salt)
        out.append((offset, record.seq))
    return out


@dataclass
class Checker:
    """Starts a service on each crash state in one reused directory."""

    workdir: Path
    models: list[Bank]
    segment_size: int
    points: int = 0

    def recover(self, files: dict[str, bytes], expected: int, *, continue_after: bool = False,
                snapshot: int | None = None) -> None:
        materialize(files, self.workdir)
        svc = start_bank(self.workdir, segment_size=self.segment_size)
        try:
            assert svc.engine.last_seq == expected
            assert svc.model == self.models[expected]
            if snapshot is not None:
                assert svc.loaded_snapshot_seq == snapshot
            leftovers = [
                n for sub in ("journal", "snapshots") for n in os.listdir(self.workdir / sub)
                if n.startswith(".tmp-")
            ]
            assert leftovers == []
            if continue_after:
                # The recovered journal goes on at the next sequence number...
                d = svc.execute(Deposit("zed", 1))
                assert d.called and svc.engine.last_seq == expected + 1
        finally:
            stop(svc)
        if continue_after:
            # ... and that record survives a restart right behind the others.
            again = start_bank(self.workdir, segment_size=self.segment_size)
            try:
                assert again.engine.last_seq == expected + 1
                assert again.query("balance", account="zed") == 1
                model = copy.deepcopy(again.model)
                del model.accounts["zed"], model.opened_at["zed"]
                assert model == self.models[expected]
            finally:
                stop(again)
        self.points += 1


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(line)


def test_crash_at_every_offset_of_the_last_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datadir = tmp_path / "bank"
    w = Writer(datadir, segment_size=1 << 20)
    for c in deposits(5):
        w.single(c)
    assert w.snapshot() == 5
    w.single(Deposit("bob", 3))
    first, last, length = w.lead_and_batch(Deposit("alice", 100), MIXED + deposits(3, "dave"))
    acked_before = first - 1
    w.close()
    files = files_of(datadir)
    seg = f"journal/{segment_name(1)}"
    data = files[seg]
    assert len(data) - length == record_ends(data)[first - 2][0]  # the batch is the file's tail
    start = len(data) - length
    ends = record_ends(data)
    check = Checker(tmp_path / "work", w.models, 1 << 20)
    for offset in range(start, len(data) + 1):
        state = dict(files)
        state[seg] = data[:offset]
        expected = max(seq for end, seq in ends if end <= offset)
        assert acked_before <= expected <= last
        check.recover(state, expected, continue_after=offset % 5 == 0, snapshot=5)
    assert check.points == length + 1
    report(capsys, f"\ncrash points, last batch ({last - first + 1} records, {length} bytes): "
                   f"{check.points}")


def test_crash_at_every_offset_around_a_segment_rollover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = 600
    datadir = tmp_path / "bank"
    w = Writer(datadir, segment_size=size)
    old = datadir / "journal" / segment_name(1)
    i = 0
    while not old.exists() or old.stat().st_size < 400:
        w.single(Deposit("alice", 1 + i))
        i += 1
    # The old segment's last batch, and while it is written the next one
    # queues up; that one is the first write of a new segment.
    lead_d = w._execute(Deposit("alice", 1000))
    b_ds = [w._execute(c) for c in MIXED]
    w.runner.release()  # lead written; batch B to the writer
    assert lead_d.called
    c_ds = [w._execute(c) for c in deposits(4, "erin", 10)]
    w.runner.release()  # batch B written to the old segment; batch C to the writer
    assert all(d.called for d in b_ds) and not any(d.called for d in c_ds)
    assert old.stat().st_size >= size and len(os.listdir(datadir / "journal")) == 1
    w.runner.release()  # batch C: rollover, header, then C
    assert all(d.called for d in c_ds)
    w.close()
    b_first, b_last = w.acked - 4 - len(MIXED) + 1, w.acked - 4
    c_first = b_last + 1
    files = files_of(datadir)
    old_rel, new_rel = f"journal/{segment_name(1)}", f"journal/{segment_name(c_first)}"
    assert sorted(f for f in files if f.startswith("journal/")) == [old_rel, new_rel]
    old_data, new_data = files[old_rel], files[new_rel]
    old_ends, new_ends = record_ends(old_data), record_ends(new_data)
    assert old_ends[-1][1] == b_last and new_ends[-1][1] == w.acked
    b_start = next(end for end, seq in old_ends if seq == b_first - 1)
    check = Checker(tmp_path / "work", w.models, size)
    counts = {}

    # 1. Crash while batch B goes to the old segment: no new segment yet.
    without_new = {k: v for k, v in files.items() if k != new_rel}
    for offset in range(b_start, len(old_data) + 1):
        state = dict(without_new)
        state[old_rel] = old_data[:offset]
        expected = max(seq for end, seq in old_ends if end <= offset)
        assert expected >= b_first - 1
        check.recover(state, expected, continue_after=offset % 4 == 0)
    counts["old segment's last batch"] = len(old_data) + 1 - b_start

    # 2. Crash while the new segment's header goes to its temp file.
    header = new_data[: rec.SEGMENT_HEADER_SIZE]
    for offset in range(len(header) + 1):
        state = dict(without_new)
        state[f"journal/.tmp-{segment_name(c_first)}"] = header[:offset]
        check.recover(state, b_last, continue_after=True)
    counts["new segment's temp header"] = len(header) + 1

    # 3. Crash after the rename: header only, then every prefix of batch C.
    for offset in range(rec.SEGMENT_HEADER_SIZE, len(new_data) + 1):
        state = dict(files)
        state[new_rel] = new_data[:offset]
        expected = max([seq for end, seq in new_ends if end <= offset], default=b_last)
        check.recover(state, expected, continue_after=offset % 4 == 0 or offset == rec.SEGMENT_HEADER_SIZE)
    counts["renamed segment, header and first batch"] = len(new_data) + 1 - rec.SEGMENT_HEADER_SIZE

    assert check.points == sum(counts.values())
    report(capsys, f"\ncrash points around a segment rollover: {check.points} {counts}")


def test_crash_inside_a_snapshot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datadir = tmp_path / "bank"
    w = Writer(datadir, segment_size=1 << 20)
    for c in deposits(4) + MIXED:
        w.single(c)
    older = w.snapshot()
    for c in deposits(6, "dave", 5):
        w.single(c)
    newer = w.snapshot()
    w.single(Deposit("erin", 9))
    w.close()
    total = w.acked
    files = files_of(datadir)
    new_rel = f"snapshots/{snapshot_name(newer)}"
    snap = files[new_rel]
    assert len(snap) > SNAPSHOT_HEADER_SIZE + 50
    without = {k: v for k, v in files.items() if k != new_rel}
    check = Checker(tmp_path / "work", w.models, 1 << 20)
    counts = {}

    # 1. The temp file at every length (complete but not renamed included):
    #    deleted at start-up, the older snapshot and a longer replay used.
    for offset in range(len(snap) + 1):
        state = dict(without)
        state[f"snapshots/.tmp-{snapshot_name(newer)}"] = snap[:offset]
        check.recover(state, total, snapshot=older)
    counts["temp snapshot"] = len(snap) + 1

    # 2. The final name holding a cut-short file (a file system that did not
    #    keep the write order): skipped for the older one.
    sample = sorted(
        set(range(SNAPSHOT_HEADER_SIZE + 1)) | set(range(SNAPSHOT_HEADER_SIZE, len(snap), 7))
        | {len(snap) - 1}
    )
    for offset in sample:
        state = dict(without)
        state[new_rel] = snap[:offset]
        check.recover(state, total, snapshot=older)
    state = dict(without)
    state[new_rel] = snap
    check.recover(state, total, snapshot=newer)  # the control: whole, it is used
    counts["final-named snapshot, sampled"] = len(sample) + 1

    assert check.points == sum(counts.values())
    report(capsys, f"\ncrash points inside a snapshot write: {check.points} {counts}")
