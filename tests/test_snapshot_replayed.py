"""
Snapshots written by a separate process that replays the journal
(``JournalService(snapshot_app=...)``): real reactor, real processes.
"""

from __future__ import annotations

import os
import pickle
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from examples.bank import Deposit, Transfer, bank
from txjournal import JournalService
from txjournal.errors import SnapshotError
from txjournal.journal.memory import MemoryJournal, MemorySnapshotStore
from txjournal.snapshot import replayed
from txjournal.snapshot.file import FileSnapshotStore

pytestmark = pytest.mark.timeout(60)

APP = "examples.bank:bank"


def start(datadir: str, **kw: Any) -> JournalService[Any]:
    kw.setdefault("snapshot_on_stop", False)
    svc = JournalService(bank, datadir, snapshot_app=APP, **kw)
    svc.startService()
    return svc


def snapshot_model(datadir: str, seq: int) -> Any:
    return pickle.loads(FileSnapshotStore(os.path.join(datadir, "snapshots")).load(seq))


@pytest_twisted.ensureDeferred
async def test_snapshot_under_load_is_exactly_the_model_at_its_sequence_number(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir)
    running = True

    async def caller(i: int) -> None:
        n = 0
        while running:
            n += 1
            if n % 3:
                await svc.execute(Deposit(f"c{i}", n))
            else:
                await svc.execute(Transfer(f"c{i}", f"c{(i + 1) % 5}", 1))

    callers = [ensureDeferred(caller(i)) for i in range(5)]
    for _ in range(50):
        await svc.execute(Deposit("c0", 1))
    # Same reactor turn: the snapshot covers exactly what is applied now.
    at = svc.engine.applied_seq
    expected = dict(svc.model.accounts)
    snapshot = svc.snapshot()
    assert svc.last_snapshot_pause < 0.05  # it only started a process
    assert await snapshot == at
    running = False
    await gatherResults(callers)
    assert svc.engine.applied_seq > at  # commands kept flowing meanwhile
    assert snapshot_model(datadir, at).accounts == expected
    live = dict(svc.model.accounts)
    last = svc.engine.applied_seq
    await svc.stopService()

    again = start(datadir)
    assert (again.loaded_snapshot_seq, again.replayed) == (at, last - at)
    assert again.model.accounts == live
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_replayed_snapshots_chain_and_prune(tmp_path: Any, captured: list[Any]) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, keep_snapshots=2)
    seqs = []
    for round_ in range(3):
        for _ in range(20):
            await svc.execute(Deposit("a", round_ + 1))
        seqs.append(await svc.snapshot())
    assert seqs == [20, 40, 60]
    assert FileSnapshotStore(os.path.join(datadir, "snapshots")).list() == [60, 40]
    assert snapshot_model(datadir, 60).accounts == {"a": 120}
    assert "replayed by process" in texts(captured)
    assert oct(os.stat(os.path.join(datadir, "snapshots", os.listdir(
        os.path.join(datadir, "snapshots"))[0])).st_mode & 0o777) == "0o600"
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_killed_snapshot_process_fails_the_snapshot_and_nothing_else(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir)
    await svc.execute(Deposit("a", 1))
    assert await svc.snapshot() == 1
    await svc.execute(Deposit("a", 1))
    real_spawn = replayed.spawn

    def spawn_and_kill(*args: Any) -> Any:
        report = real_spawn(*args)
        os.kill(report.pid, signal.SIGKILL)
        return report

    monkeypatch.setattr(replayed, "spawn", spawn_and_kill)
    with pytest.raises(SnapshotError, match="killed by signal 9"):
        await svc.snapshot()
    monkeypatch.setattr(replayed, "spawn", real_spawn)
    assert await svc.execute(Deposit("a", 1)) == 3
    assert sorted(os.listdir(os.path.join(datadir, "snapshots"))) == [
        "00000000000000000001.snapshot"
    ]
    assert await svc.snapshot() == 3  # the next one works
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_failing_snapshot_process_reports_its_error(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir)
    await svc.execute(Deposit("a", 1))
    # Damage the journal behind the running service's back: the child's
    # replay meets it, says so, and the service carries on.
    segment = os.path.join(datadir, "journal", sorted(os.listdir(os.path.join(datadir, "journal")))[0])
    with open(segment, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xff\xff")
    await svc.execute(Deposit("a", 1))  # valid data after the damage
    with pytest.raises(SnapshotError, match="JournalCorrupt"):
        await svc.snapshot()
    assert os.listdir(os.path.join(datadir, "snapshots")) == []
    assert svc.engine.failed is None
    await svc.stopService()


def test_the_child_refuses_a_schema_of_another_name(tmp_path: Any) -> None:
    svc = start(str(tmp_path / "bank"), reactor=None)
    try:
        with pytest.raises(SnapshotError, match="runs 'other'"):
            replayed.write(APP, "other", str(tmp_path / "bank"), 0)
    finally:
        svc.stopService()


def test_the_child_refuses_to_snapshot_beyond_the_journal(tmp_path: Any) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir)
    svc.stopService()
    with pytest.raises(SnapshotError, match="ends at 0, before the snapshot's 5"):
        replayed.write(APP, bank.name, datadir, 5)


def report(out: bytes, err: bytes, reason: Exception) -> Any:
    r = replayed._Report(7)
    r.pid = 1234
    r.outReceived(out)
    r.errReceived(err)
    box: list[Any] = []
    r.done.addBoth(box.append)
    r.processEnded(Failure(reason))
    return box[0]


def test_report_parsing() -> None:
    assert report(b'{"path": "/x/7.snapshot", "size": 9}', b"", ProcessDone(0)) == ("/x/7.snapshot", 9)
    bad = report(b"", b"Traceback...\nImportError: no module named nope\n", ProcessTerminated(1))
    assert isinstance(bad.value, SnapshotError)
    assert str(bad.value) == (
        "the snapshot process 1234 failed (exit status 1): ImportError: no module named nope"
    )
    silent = report(b"garbage", b"", ProcessDone(0))
    assert "exited without a report: no error output" in str(silent.value)
    killed = report(b"", b"", ProcessTerminated(None, signal.SIGKILL))
    assert str(killed.value) == "the snapshot process 1234 was killed by signal 9"


@pytest.mark.parametrize(
    "app, kw, message",
    [
        ("examples.bank", {}, "must name an importable schema"),
        ("__main__:bank", {}, "must name an importable schema"),
        (APP, {"journal": MemoryJournal()}, "file journal and snapshots"),
        (APP, {"snapshots": MemorySnapshotStore()}, "file journal and snapshots"),
        (APP, {"serializer": object()}, "default serializer"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Any, app: str, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JournalService(bank, str(tmp_path / "d"), snapshot_app=app, **kw)


@pytest.mark.parametrize(
    "app, message",
    [
        ("examples.nope:bank", "cannot import module 'examples.nope'"),
        ("examples.bank:nope", "has no attribute 'nope'"),
        ("history_apps:bent", "not the service's 'bank' object"),
    ],
)
def test_a_schema_the_child_would_not_find_stops_start_up(tmp_path: Any, app: str, message: str) -> None:
    svc = JournalService(bank, str(tmp_path / "d"), snapshot_app=app)
    with pytest.raises(ValueError, match=message):
        svc.startService()
    assert not svc.running


def test_a_reactor_that_cannot_start_processes_is_refused(tmp_path: Any) -> None:
    svc = JournalService(bank, str(tmp_path / "d"), snapshot_app=APP, reactor=Clock())
    with pytest.raises(ValueError, match="reactor that can start processes"):
        svc.startService()


@pytest.fixture
def captured() -> Any:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events: list[dict[str, Any]]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


class _NoSignalTransport:
    """A child that has closed its output but whose exit no SIGCHLD reports."""

    pid = 4321

    def __init__(self, report: Any, exits_after: int) -> None:
        self.report, self.exits_after, self.reaped = report, exits_after, 0

    def reapProcess(self) -> None:
        self.reaped += 1
        if self.reaped == self.exits_after:
            self.report.processEnded(Failure(ProcessDone(0)))


def test_the_exit_is_found_without_sigchld() -> None:
    clock = Clock()
    r = replayed._Report(3, clock)
    r.transport = _NoSignalTransport(r, exits_after=3)  # type: ignore[assignment]
    r.outReceived(b'{"path": "/x/3.snapshot", "size": 1}')
    r.childConnectionLost(1)
    assert r.transport.reaped == 0  # stderr still open
    r.childConnectionLost(2)
    assert not r.done.called
    clock.advance(0.05)
    assert not r.done.called
    clock.advance(0.05)
    box: list[Any] = []
    r.done.addBoth(box.append)
    assert box == [("/x/3.snapshot", 1)]
    clock.advance(1)
    assert r.transport.reaped == 3  # stopped looking once it was found


APP_SOURCE = '''
from dataclasses import dataclass
from txjournal import Context, Schema

schema = Schema("tally", model=dict)


@schema.command("add")
@dataclass
class Add:
    key: str
    n: int

    def execute(self, model: dict, ctx: Context) -> int:
        model[self.key] = model.get(self.key, 0) + self.n
        return model[self.key]
'''


@pytest_twisted.ensureDeferred
async def test_the_process_finds_the_app_where_the_service_did(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An application importable only through the service's sys.path (not
    # from the current directory, not installed): the process gets that path.
    code = tmp_path / "code"
    code.mkdir()
    (code / "tallyapp_for_snapshot_test.py").write_text(APP_SOURCE)
    monkeypatch.syspath_prepend(str(code))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    import tallyapp_for_snapshot_test as app  # type: ignore[import-not-found]

    datadir = str(tmp_path / "data")
    svc = JournalService(
        app.schema, datadir, snapshot_app="tallyapp_for_snapshot_test:schema",
        snapshot_on_stop=False,
    )
    svc.startService()
    for i in range(10):
        await svc.execute(app.Add("k", i))
    assert await svc.snapshot() == 10
    await svc.stopService()
    assert snapshot_model(datadir, 10) == {"k": 45}
