"""
Real crashes: SIGKILL an in-process writer (``tests/crash_writer.py``) at
random points and check what survives.

After each kill the data directory is reopened in this process and must
hold every acknowledged command, with the outcome the caller was told,
dense sequence numbers, a model equal to a from-scratch replay of the
recovered records, conserved money, and a service that goes on at the
next sequence number. Subprocess output is read by a thread into a queue
and awaited with timeouts; nothing here sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from examples.bank import Bank, Deposit, bank
from txjournal import Context, DataDirLocked, JournalService
from txjournal.journal.file import FileJournal
from txjournal.lock import DataDirLock
from txjournal.record import SEGMENT_HEADER_SIZE, Record, decode_at, decode_segment_header

HERE = Path(__file__).resolve().parent
WRITER = HERE / "crash_writer.py"
ROOT = HERE.parent

SNAPSHOT_NAME = re.compile(r"^(\d{20})\.snapshot$")

LINE_TIMEOUT = 15.0  # seconds to wait for one line from the writer


def _runner(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


# -- the writer subprocess ---------------------------------------------------------


class Writer:
    """A running ``crash_writer.py`` whose stdout lines arrive on a queue."""

    def __init__(self, datadir: Path, log: Path, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.stderr_path = log
        self._stderr = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(datadir), *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            cwd=str(ROOT),
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if raw.endswith(b"\n"):  # a partial last line was cut by the kill
                self.lines.put(json.loads(raw))
        self.lines.put(None)

    def next_event(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        try:
            event = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"writer sent nothing for {timeout}s; stderr: {self.stderr()}"
            ) from None
        if event is None:
            raise AssertionError(
                f"writer exited ({self.proc.wait(LINE_TIMEOUT)}); stderr: {self.stderr()}"
            )
        self.seen.append(event)
        return event

    def wait_for(self, kind: str) -> dict[str, Any]:
        while True:
            event = self.next_event()
            if event["event"] == kind:
                return event
            assert event["event"] == "ack", event

    def kill(self) -> list[dict[str, Any]]:
        """SIGKILL, reap, and return every event it printed."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(LINE_TIMEOUT)
        self._reader.join(LINE_TIMEOUT)
        assert not self._reader.is_alive()
        while True:
            event = self.lines.get_nowait()
            if event is None:
                break
            self.seen.append(event)
        self._stderr.close()
        assert self.proc.returncode == -signal.SIGKILL, (self.proc.returncode, self.stderr())
        return self.seen

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(LINE_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


StartWriter = Callable[..., Writer]


@pytest.fixture
def writers() -> Iterator[StartWriter]:
    started: list[Writer] = []

    def start(datadir: Path, log: Path, *args: str) -> Writer:
        w = Writer(datadir, log, *args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


# -- recovery checks ---------------------------------------------------------------


@dataclass
class Replayed:
    records: list[Record]
    model: Bank
    outcomes: dict[int, tuple[Any, ...]]
    deposited: int
    torn_tail: tuple[str, int, str] | None


def replay_from_scratch(datadir: Path) -> Replayed:
    """Read the journal without repairing it and apply every record to a new model."""
    journal = FileJournal(str(datadir / "journal"), readonly=True)
    journal.open()
    records = list(journal.replay())
    model = bank.new_model()
    outcomes: dict[int, tuple[Any, ...]] = {}
    deposited = 0
    for r in records:
        command = bank.decode(r.name, r.version, r.fields)
        ctx = Context(r.seq, r.time_ns, journal.journal_id, r.user)
        try:
            result = command.execute(model, ctx)  # type: ignore[attr-defined]
        except Exception as e:
            outcomes[r.seq] = (False, type(e).__name__)
        else:
            outcomes[r.seq] = (True, json.loads(json.dumps(result)))
            if isinstance(command, Deposit):
                deposited += command.amount
    return Replayed(records, model, outcomes, deposited, journal.torn_tail)


def start_service(datadir: Path) -> JournalService[Bank]:
    service: JournalService[Bank] = JournalService(
        bank, str(datadir), snapshot_interval=None, snapshot_on_stop=False,
        reactor=Clock(), runner=_runner,
    )
    service.startService()
    return service


def fired(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


@dataclass
class Recovered:
    last_seq: int  # of the command executed after the restart
    snapshot_seq: int  # covered by the snapshot the restart loaded (0: none)
    torn_tail: bool  # the restart had to cut a torn tail


def check_recovery(datadir: Path, acks: list[dict[str, Any]]) -> Recovered:
    """Every check of a recovered data directory."""
    replayed = replay_from_scratch(datadir)
    records = replayed.records
    n = len(records)
    # Dense: 1..n, no gaps, no repeats.
    assert [r.seq for r in records] == list(range(1, n + 1))
    # Every acknowledged command is there, as sent, with the outcome told.
    seqs = [a["seq"] for a in acks]
    assert len(set(seqs)) == len(seqs), "two acks for one seq"
    for a in acks:
        assert a["seq"] <= n, f"acknowledged {a['seq']} lost; journal ends at {n}"
        r = records[a["seq"] - 1]
        assert r.name == a["cmd"], (a, r)
        assert msgpack.unpackb(r.fields, raw=False) == a["fields"], (a, r)
        told = (True, a["result"]) if a["ok"] else (False, a["error"])
        assert replayed.outcomes[a["seq"]] == told, (a, replayed.outcomes[a["seq"]])
    # Money is conserved: transfers move it, only successful deposits add it.
    assert sum(replayed.model.accounts.values()) == replayed.deposited
    assert all(v >= 0 for v in replayed.model.accounts.values())
    # The service's own recovery (snapshot, if any, plus replay) agrees.
    service = start_service(datadir)
    snapshot_seq = service.loaded_snapshot_seq
    try:
        assert service.model == replayed.model
        assert service.loaded_snapshot_seq + service.replayed == n
        assert service.engine.last_seq == n
        result = fired(service.execute(Deposit(f"restart{n + 1}", 7)))
        assert result == 7
        assert service.engine.last_seq == n + 1
        assert service.query("total") == replayed.deposited + 7
    finally:
        fired(service.stopService())
    after = replay_from_scratch(datadir)
    assert [r.seq for r in after.records] == list(range(1, n + 2))
    assert after.records[:n] == records
    last = after.records[-1]
    assert (last.name, msgpack.unpackb(last.fields)) == (
        "deposit", {"account": f"restart{n + 1}", "amount": 7},
    )
    assert after.torn_tail is None
    return Recovered(n + 1, snapshot_seq, replayed.torn_tail is not None)


def lose_unsynced_tail(datadir: Path, top: int, rng: random.Random) -> bool:
    """
    Model a power loss on top of the kill: bytes after record ``top`` (the
    last one known to be synced) may never have reached the disk, so cut the
    last segment anywhere after it (a segment's header is durable before the
    segment gets its name), always inside a record. Returns whether there
    was anything to cut.
    """
    journal = FileJournal(str(datadir / "journal"), readonly=True)
    journal.open()
    if not journal.segments:
        return False
    path = journal.segments[-1][1]
    data = Path(path).read_bytes()
    salt = decode_segment_header(data).salt_bytes
    floor = offset = SEGMENT_HEADER_SIZE
    boundaries = {offset}
    while offset < len(data):
        record, offset = decode_at(data, offset, salt)
        boundaries.add(offset)
        if record.seq <= top:
            floor = offset
    inside = [o for o in range(floor, len(data)) if o not in boundaries]
    if not inside:
        return False
    os.truncate(path, rng.choice(inside))
    return True


def ack_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    bad = [e for e in events if e["event"] in ("fatal", "error")]
    assert not bad, bad
    return [e for e in events if e["event"] == "ack"]


# -- the tests ---------------------------------------------------------------------


def kill_points(rng: random.Random) -> list[int]:
    """How many acks to see before each kill: very early ones, then later ones."""
    return [0, 1, 2, 3, 5, rng.randint(6, 40), rng.randint(6, 40), rng.randint(40, 300),
            rng.randint(40, 300), rng.randint(300, 1500), rng.randint(1500, 4000),
            rng.randint(1500, 4000)]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigkill_at_random_points(tmp_path: Path, writers: StartWriter) -> None:
    """
    One fresh data directory per kill point: acks seen before the kill
    range from 0 to thousands; every other point also loses the unsynced tail.
    """
    rng = random.Random(20240601)
    points = kill_points(rng)
    assert len(points) >= 8
    repaired = cuts = 0
    for i, point in enumerate(points):
        datadir = tmp_path / f"data{i}"
        w = writers(
            datadir, tmp_path / f"writer{i}.err",
            "--callers", str(rng.choice([1, 4, 16, 32])),
            "--seed", str(rng.randrange(1 << 30)),
            "--segment-size", str(rng.choice([4096, 16384, 1 << 20])),
        )
        ready = w.wait_for("ready")
        assert ready["next_seq"] == 1 and ready["pid"] == w.proc.pid
        for _ in range(point):
            w.wait_for("ack")
        acks = ack_events(w.kill())
        assert len(acks) >= point
        if i % 2:
            cuts += lose_unsynced_tail(datadir, max((a["seq"] for a in acks), default=0), rng)
        repaired += check_recovery(datadir, acks).torn_tail
    assert repaired == cuts
    assert cuts, "nothing was unsynced at any kill: the power-loss path was not tested"


def newest_snapshot(datadir: Path) -> int:
    """The newest snapshot's seq; a kill mid-write may leave a ``.tmp-`` file, not counted."""
    names = os.listdir(datadir / "snapshots") if (datadir / "snapshots").exists() else []
    return max((int(m.group(1)) for m in map(SNAPSHOT_NAME.match, names) if m), default=0)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_repeated_crashes_on_one_datadir(tmp_path: Path, writers: StartWriter) -> None:
    """
    Kill, restart on the same directory, kill again: with small segments and
    frequent snapshots, kills can land during rollovers, snapshot writes and
    start-up replay too, and some cycles also lose their unsynced tail.
    Every ack of every run must survive, and no seq is ever reused.
    """
    rng = random.Random(99)
    datadir = tmp_path / "data"
    all_acks: list[dict[str, Any]] = []
    expected_next = 1
    cycles = 10
    loaded_snapshot = repaired = cuts = 0
    for cycle in range(cycles):
        w = writers(
            datadir, tmp_path / f"writer{cycle}.err",
            "--callers", str(rng.choice([2, 8, 24])),
            "--seed", f"{cycle}",
            "--segment-size", "2048",
            "--snapshot-interval", "0.02",
        )
        # Cycles 3 and 7 are killed before "ready": during start-up
        # (snapshot load, replay, torn-tail repair) or even before it.
        if cycle not in (3, 7):
            ready = w.wait_for("ready")
            assert ready["next_seq"] == expected_next
            for _ in range(rng.choice([0, 2, 50, 400, 1500])):
                w.wait_for("ack")
        acks = ack_events(w.kill())
        for a in acks:
            assert a["seq"] >= expected_next, "a seq was reused after a restart"
        all_acks.extend(acks)
        if cycle % 3 == 1:
            # A snapshot only ever covers synced commands, so it bounds the cut too.
            durable = max([a["seq"] for a in all_acks] + [newest_snapshot(datadir)])
            cuts += lose_unsynced_tail(datadir, durable, rng)
        recovered = check_recovery(datadir, all_acks)
        loaded_snapshot += recovered.snapshot_seq > 0
        repaired += recovered.torn_tail
        expected_next = recovered.last_seq + 1
        all_acks.append({
            "seq": recovered.last_seq, "cmd": "deposit", "ok": True, "result": 7,
            "fields": {"account": f"restart{recovered.last_seq}", "amount": 7},
        })
    assert loaded_snapshot, "no restart loaded a snapshot: the snapshot path was not exercised"
    assert repaired == cuts
    assert len(os.listdir(datadir / "journal")) > 3
    assert len(all_acks) > 1000


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_second_owner_is_refused_until_the_holder_dies(tmp_path: Path, writers: StartWriter) -> None:
    datadir = tmp_path / "data"
    holder = writers(datadir, tmp_path / "holder.err", "--callers", "2", "--seed", "1")
    ready = holder.wait_for("ready")
    pid = holder.proc.pid
    assert ready["pid"] == pid
    holder.wait_for("ack")

    # This process: refused at once, naming the holder's pid.
    service: JournalService[Bank] = JournalService(
        bank, str(datadir), snapshot_interval=None, snapshot_on_stop=False,
        reactor=Clock(), runner=_runner,
    )
    started = time.monotonic()
    with pytest.raises(DataDirLocked) as info:
        service.startService()
    assert time.monotonic() - started < 2.0
    assert f"pid {pid} " in str(info.value) and str(datadir) in str(info.value)
    assert info.value.holder.startswith(f"pid {pid} on ")
    assert not service.running
    with pytest.raises(DataDirLocked):
        DataDirLock(str(datadir)).acquire()

    # Another process: exits at once with the same error.
    second = writers(datadir, tmp_path / "second.err", "--callers", "1")
    event = second.next_event()
    assert event["event"] == "error" and event["type"] == "DataDirLocked"
    assert f"pid {pid} " in event["message"]
    assert second.proc.wait(LINE_TIMEOUT) == 2

    # The holder was not disturbed: it is still acknowledging commands.
    holder.wait_for("ack")
    acks = ack_events(holder.kill())

    # The kernel dropped the flock with the process: the lock is free now.
    lock = DataDirLock(str(datadir))
    lock.acquire()
    try:
        assert lock.held
        text = (datadir / "LOCK").read_text()
        assert text.startswith(f"pid {os.getpid()} on ")
    finally:
        lock.release()
    assert check_recovery(datadir, acks).last_seq > max(a["seq"] for a in acks)
