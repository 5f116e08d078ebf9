"""
Snapshots written by a separate process that replays the journal
(``JournalService(snapshot_app=...)``): real reactor, real processes.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
from typing import Any

import pytest
import pytest_twisted
from conftest import texts, until
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from examples.bank import Deposit, Transfer, bank
from txjournal import DataDirLocked, JournalService, JournalWriteError
from txjournal.errors import SnapshotError
from txjournal.fs import OSFileSystem
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
    assert svc.last_snapshot_pause < 0.5  # it only started a process (3 ms here)
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
async def test_a_process_that_reports_an_error_is_replaced_by_a_snapshot_of_the_live_model(
    tmp_path: Any, captured: list[Any]
) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir)
    await svc.execute(Deposit("a", 1))
    # Damage the journal behind the running service's back: the process's
    # replay meets it and says so; the live model is still good.
    segment = os.path.join(datadir, "journal", sorted(os.listdir(os.path.join(datadir, "journal")))[0])
    with open(segment, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xff\xff")
    await svc.execute(Deposit("a", 1))  # valid data after the damage
    assert await svc.snapshot() == 2
    log = texts(captured)
    assert "JournalCorrupt" in log and "writing a snapshot of the live model" in log
    assert "forked child" in log
    assert snapshot_model(datadir, 2).accounts == {"a": 2}
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


def report(out: bytes, err: bytes, reason: Exception, stdout: bytes = b"") -> Any:
    r = replayed._Report(7)
    r.pid = 1234
    r.childDataReceived(1, stdout)
    r.childDataReceived(replayed.REPORT_FD, out)
    r.childDataReceived(2, err)
    box: list[Any] = []
    r.done.addBoth(box.append)
    r.processEnded(Failure(reason))
    return box[0]


def test_report_parsing() -> None:
    ok = report(b'{"path": "/x/7.snapshot", "size": 9, "skipped": [[5, "bad digest"]]}', b"",
                ProcessDone(0))
    assert ok == replayed.Written("/x/7.snapshot", 9, [(5, "bad digest")])
    bad = report(b"", b"Traceback...\nImportError: no module named nope\n", ProcessTerminated(1))
    assert isinstance(bad.value, replayed.ProcessFailed) and bad.value.stage == "load"
    assert str(bad.value) == (
        "the snapshot process 1234 failed (exit status 1): ImportError: no module named nope"
    )
    # Its own report names the error and the stage, whatever stderr holds.
    said = report(b'{"error": "writing snapshot 7 in /x failed: the disk is full", "stage": "save"}',
                  b"chatter\n" * 2000, ProcessTerminated(1))
    assert isinstance(said.value, replayed.ProcessFailed) and said.value.stage == "save"
    assert str(said.value).endswith("writing snapshot 7 in /x failed: the disk is full")
    # Without one, the last line of stderr, however much came before it.
    chatty = report(b"", b"chatter\n" * 2000 + b"RuntimeError: the real cause\n", ProcessTerminated(1))
    assert str(chatty.value).endswith("RuntimeError: the real cause")
    # Killed after it had written the snapshot and said so: the snapshot stands.
    late = report(b'{"path": "/x/7.snapshot", "size": 9}', b"", ProcessTerminated(None, 9))
    assert late == ("/x/7.snapshot", 9, [])
    silent = report(b"garbage", b"", ProcessDone(0))
    assert "exited without a report: no error output" in str(silent.value)
    killed = report(b"", b"", ProcessTerminated(None, signal.SIGKILL))
    assert str(killed.value) == "the snapshot process 1234 was killed by signal 9"
    assert not isinstance(killed.value, replayed.ProcessFailed)  # no second try after a kill
    # What the application prints is not the report.
    noisy = report(b'{"path": "/x/7.snapshot", "size": 9}', b"", ProcessDone(0), stdout=b"hello\n")
    assert noisy == ("/x/7.snapshot", 9, [])
    printed_only = report(b"", b"", ProcessDone(0), stdout=b'{"path": "/evil", "size": 1}')
    assert "exited without a report" in str(printed_only.value)


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


# -- applications that make the process's life harder ------------------------------

APP_TEMPLATE = '''
from dataclasses import dataclass
from txjournal import Context, Schema
{prelude}
schema = Schema("tally", model=dict)


@schema.command("add")
@dataclass
class Add:
    key: str
    n: int

    def execute(self, model: dict, ctx: Context) -> int:
        {in_execute}
        model[self.key] = model.get(self.key, 0) + self.n
        return model[self.key]


@schema.command("fill")
@dataclass
class Fill:
    size: int

    def execute(self, model: dict, ctx: Context) -> None:
        model["filler"] = b"x" * self.size
'''


def make_app(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, name: str, prelude: str = "",
    in_execute: str = "pass",
) -> Any:
    import importlib

    code = tmp_path / f"code-{name}"
    code.mkdir()
    (code / f"{name}.py").write_text(APP_TEMPLATE.format(prelude=prelude, in_execute=in_execute))
    monkeypatch.syspath_prepend(str(code))
    return importlib.import_module(name)


def capture_spawns(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    spawned: list[Any] = []
    real_spawn = replayed.spawn

    def spawn(*args: Any) -> Any:
        report = real_spawn(*args)
        spawned.append(report)
        return report

    monkeypatch.setattr(replayed, "spawn", spawn)
    return spawned


def stop_forked_children(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Forked snapshot children are SIGSTOPped as soon as they exist; their pids."""
    from txjournal.snapshot import fork

    pids: list[int] = []
    real_start = fork.start

    def start_and_stop(*args: Any) -> Any:
        pid, pipe = real_start(*args)
        os.kill(pid, signal.SIGSTOP)
        pids.append(pid)
        return pid, pipe

    monkeypatch.setattr(fork, "start", start_and_stop)
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_what_the_application_prints_is_not_taken_for_the_report(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(
        tmp_path, monkeypatch, "noisy_tally_app", prelude='print("importing, hello")',
        in_execute='print("executing", self)',
    )
    datadir = str(tmp_path / "data")
    svc = JournalService(
        app.schema, datadir, snapshot_app="noisy_tally_app:schema", snapshot_on_stop=False,
        keep_snapshots=1,
    )
    svc.startService()
    for round_ in range(3):
        for i in range(5):
            await svc.execute(app.Add("k", i))
        assert await svc.snapshot() == 5 * (round_ + 1)
    assert FileSnapshotStore(os.path.join(datadir, "snapshots")).list() == [15]  # pruned
    assert snapshot_model(datadir, 15) == {"k": 30}
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_thread_the_application_starts_does_not_keep_the_process(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(
        tmp_path, monkeypatch, "threaded_tally_app",
        # Only in the snapshot process (whose environment has this variable):
        # a thread that never ends, which would keep an interpreter from exiting.
        prelude=(
            "import os, threading, time\n"
            "if 'TXJOURNAL_SYS_PATH' in os.environ:\n"
            "    threading.Thread(target=time.sleep, args=(3600,)).start()"
        ),
    )
    datadir = str(tmp_path / "data")
    svc = JournalService(
        app.schema, datadir, snapshot_app="threaded_tally_app:schema", snapshot_on_stop=False,
        snapshot_timeout=30,
    )
    svc.startService()
    await svc.execute(app.Add("k", 1))
    assert await svc.snapshot() == 1
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_process_killed_while_writing_leaves_no_temp_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(tmp_path, monkeypatch, "big_tally_app")
    spawned = capture_spawns(monkeypatch)
    datadir = str(tmp_path / "data")
    snapshots = os.path.join(datadir, "snapshots")
    svc = JournalService(
        app.schema, datadir, snapshot_app="big_tally_app:schema", snapshot_on_stop=False,
    )
    svc.startService()
    await svc.execute(app.Fill(200 * 2**20))  # written in synced 2 MiB slices: takes a while
    added = 0
    for _ in range(5):
        added = await svc.execute(app.Add("k", 1))  # something new to snapshot each time
        snapshot = svc.snapshot()
        child = spawned[-1]
        await until(
            lambda c=child: any(n.startswith(".tmp-") for n in os.listdir(snapshots))
            or c.done.called,
            every=0.002,
        )
        if not child.done.called:
            break
        await snapshot  # a loaded machine let it finish before we looked: again
        for name in os.listdir(snapshots):
            os.unlink(os.path.join(snapshots, name))
    else:
        pytest.fail("never caught the snapshot process writing")
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(SnapshotError, match="killed by signal 9"):
        await snapshot
    assert os.listdir(snapshots) == []  # its temp file is gone, nothing else came
    assert await svc.execute(app.Add("k", 1)) == added + 1  # the service carries on
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_hung_process_is_killed_after_the_timeout(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = capture_spawns(monkeypatch)
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_timeout=1.0)
    await svc.execute(Deposit("a", 1))
    snapshot = svc.snapshot()
    (child,) = spawned
    os.kill(child.pid, signal.SIGSTOP)  # hangs, as far as the service can tell
    with pytest.raises(SnapshotError, match="killed: it did not finish within 1 s"):
        await snapshot
    assert not alive(child.pid)  # killed and reaped
    assert os.listdir(os.path.join(datadir, "snapshots")) == []
    svc.snapshot_timeout = None  # a loaded machine may need more than 1 s
    assert await svc.snapshot() == 1  # the next one works
    await svc.stopService()


class _BreakableFS(OSFileSystem):
    def __init__(self) -> None:
        self.broken = False

    def fdatasync(self, fd: int) -> None:
        if self.broken:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fdatasync(fd)


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_a_forked_snapshot_even_after_a_write_error(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    pids = stop_forked_children(monkeypatch)
    fs = _BreakableFS()
    datadir = str(tmp_path / "bank")
    svc = JournalService(bank, datadir, fs=fs)  # snapshot_on_stop: skipped after the error
    svc.startService()
    await svc.execute(Deposit("a", 1))
    snapshot = svc.snapshot()
    fs.broken = True
    with pytest.raises(JournalWriteError):
        await svc.execute(Deposit("a", 1))
    stopped: list[Any] = []
    svc.stopService().addBoth(stopped.append)
    await deferLater(reactor, 0.3, lambda: None)
    # Still the owner while its snapshot child may write into the directory.
    assert stopped == []
    with pytest.raises(DataDirLocked):
        JournalService(bank, datadir).startService()
    os.kill(pids[0], signal.SIGCONT)
    assert await snapshot == 1
    await until(lambda: stopped == [None])
    monkeypatch.undo()
    again = JournalService(bank, datadir, snapshot_on_stop=False)
    again.startService()
    assert again.loaded_snapshot_seq == 1
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_ends_a_replaying_snapshot_and_snapshots_the_live_model(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, captured: list[Any]
) -> None:
    spawned = capture_spawns(monkeypatch)
    datadir = str(tmp_path / "bank")
    svc = start(datadir, snapshot_on_stop=True)
    for _ in range(3):
        await svc.execute(Deposit("a", 1))
    snapshot = svc.snapshot()
    (child,) = spawned
    os.kill(child.pid, signal.SIGSTOP)  # stuck, as far as anyone can tell
    await svc.stopService()  # does not wait for it: ends it
    with pytest.raises(SnapshotError, match="the service is stopping"):
        await snapshot
    assert not alive(child.pid)
    assert "Stopping: ending snapshot process" in texts(captured)
    assert "Snapshot at 3 failed" not in texts(captured)  # on purpose: not an alarm
    assert len(spawned) == 1  # the stop snapshot is of the live model, not replayed
    assert sorted(os.listdir(os.path.join(datadir, "snapshots"))) == [
        "00000000000000000003.snapshot"
    ]
    again = start(datadir)
    assert (again.loaded_snapshot_seq, again.replayed) == (3, 0)
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_a_damaged_snapshot_with_a_pruned_journal_falls_back_to_the_live_model(
    tmp_path: Any, captured: list[Any]
) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, keep_snapshots=1, prune_segments=True, segment_size=4096)
    for i in range(200):
        await svc.execute(Deposit(f"c{i % 7}", i + 1))
    assert await svc.snapshot() == 200
    journal = os.path.join(datadir, "journal")
    for i in range(200):
        await svc.execute(Deposit(f"c{i % 7}", 1))
    assert await svc.snapshot() == 400  # prunes the segments snapshot 400 covers
    assert min(int(n.split(".")[0]) for n in os.listdir(journal) if n[0].isdigit()) > 1
    for _ in range(10):
        await svc.execute(Deposit("c0", 1))
    path = FileSnapshotStore(os.path.join(datadir, "snapshots")).path(400)
    with open(path, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\x00" * 10)
    expected = dict(svc.model.accounts)
    assert await svc.snapshot() == 410
    assert "writing a snapshot of the live model" in texts(captured)
    assert snapshot_model(datadir, 410).accounts == expected
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_hung_forked_child_is_killed_after_the_timeout(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = stop_forked_children(monkeypatch)  # they hang, as far as the service can tell
    datadir = str(tmp_path / "bank")
    svc = JournalService(bank, datadir, snapshot_on_stop=False, snapshot_timeout=1.0)
    svc.startService()
    await svc.execute(Deposit("a", 1))
    with pytest.raises(SnapshotError, match="was killed: it did not finish within 1 s"):
        await svc.snapshot()
    assert not alive(pids[0])
    assert os.listdir(os.path.join(datadir, "snapshots")) == []
    monkeypatch.undo()
    svc.snapshot_timeout = None  # a loaded machine may need more than 1 s
    assert await svc.snapshot() == 1
    await svc.stopService()


def grandchild_prelude(pidfile: Any, then: str = "pass", own_session: bool = False) -> str:
    """
    App code that, only in the snapshot process (whose environment has this
    variable), starts a long-lived process inheriting its stderr (in a
    session of its own if ``own_session``: out of reach of its parent's
    group), notes its pid in ``pidfile``, then runs ``then``.
    """
    return (
        "import os, subprocess, time\n"
        "if 'TXJOURNAL_SYS_PATH' in os.environ:\n"
        f"    p = subprocess.Popen(['sleep', '60'], start_new_session={own_session})\n"
        f"    open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        f"    {then}"
    )


@pytest_twisted.ensureDeferred
async def test_a_process_that_escapes_the_group_does_not_hold_the_snapshot(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its own session: the group's SIGTERM misses it, and it holds the
    # stderr pipe open for a minute; the service stops reading after DRAIN.
    pidfile = tmp_path / "grandchild.pid"
    app = make_app(
        tmp_path, monkeypatch, "escaping_tally_app",
        prelude=grandchild_prelude(pidfile, own_session=True),
    )
    svc = JournalService(
        app.schema, str(tmp_path / "data"), snapshot_app="escaping_tally_app:schema",
        snapshot_on_stop=False,
    )
    svc.startService()
    await svc.execute(app.Add("k", 1))
    try:
        assert await svc.snapshot() == 1  # within DRAIN of the process's exit, not 60 s
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_process_the_application_starts_does_not_hold_the_snapshot(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only in the snapshot process: a grandchild that inherits its stderr
    # and outlives it by far (the pipe stays open until it exits).
    pidfile = tmp_path / "grandchild.pid"
    app = make_app(
        tmp_path, monkeypatch, "spawning_tally_app",
        prelude=grandchild_prelude(pidfile),
    )
    datadir = str(tmp_path / "data")
    svc = JournalService(
        app.schema, datadir, snapshot_app="spawning_tally_app:schema", snapshot_on_stop=False,
    )
    svc.startService()
    await svc.execute(app.Add("k", 1))
    assert await svc.snapshot() == 1  # within DRAIN of the process's exit, not 60 s
    grandchild = int(pidfile.read_text())
    # It went with the snapshot process (same group), instead of outliving it.
    await until(lambda: not alive(grandchild) or _zombie(grandchild))
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_the_timeout_kills_what_the_process_started_too(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    app = make_app(
        tmp_path, monkeypatch, "hanging_tally_app",
        prelude=grandchild_prelude(pidfile, then="time.sleep(60)"),
    )
    datadir = str(tmp_path / "data")
    svc = JournalService(
        app.schema, datadir, snapshot_app="hanging_tally_app:schema", snapshot_on_stop=False,
        snapshot_timeout=3.0,
    )
    svc.startService()
    await svc.execute(app.Add("k", 1))
    with pytest.raises(SnapshotError, match="did not finish within 3 s"):
        await svc.snapshot()
    grandchild = int(pidfile.read_text())
    await until(lambda: not alive(grandchild) or _zombie(grandchild))
    await svc.stopService()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return False


def _nice(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[16])
    except (OSError, IndexError, ValueError):
        return None


@pytest_twisted.ensureDeferred
async def test_the_process_runs_at_the_lowest_priority(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An application that, in the snapshot process only, takes its time to
    # import: long enough to look at the process's priority.
    app = make_app(
        tmp_path, monkeypatch, "slow_tally_app",
        prelude="import os, time\nif 'TXJOURNAL_SYS_PATH' in os.environ:\n    time.sleep(60)",
    )
    spawned = capture_spawns(monkeypatch)
    svc = JournalService(
        app.schema, str(tmp_path / "data"), snapshot_app="slow_tally_app:schema",
        snapshot_on_stop=False,
    )
    svc.startService()
    await svc.execute(app.Add("k", 1))
    snapshot = svc.snapshot()
    (child,) = spawned
    await until(lambda: _nice(child.pid) == 19)
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(SnapshotError, match="killed by signal 9"):
        await snapshot
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_code_changed_on_disk_is_not_replayed_into_a_snapshot(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, captured: list[Any]
) -> None:
    app = make_app(tmp_path, monkeypatch, "deployed_tally_app")
    datadir = str(tmp_path / "data")
    svc = JournalService(
        app.schema, datadir, snapshot_app="deployed_tally_app:schema", snapshot_on_stop=False,
    )
    svc.startService()
    await svc.execute(app.Add("k", 1))
    assert await svc.snapshot() == 1
    assert "replayed by process" in texts(captured)
    # A deploy without a restart: execute now doubles, on disk only.
    source = tmp_path / "code-deployed_tally_app" / "deployed_tally_app.py"
    source.write_text(source.read_text().replace(
        "model.get(self.key, 0) + self.n", "model.get(self.key, 0) + 2 * self.n"
    ))
    await svc.execute(app.Add("k", 1))
    assert await svc.snapshot() == 2
    log = texts(captured)
    assert "is not the code the service runs" in log
    assert "writing a snapshot of the live model" in log
    assert snapshot_model(datadir, 2) == {"k": 2}  # what callers were told, not 3
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_snapshot_the_process_could_not_load_is_reported_now(
    tmp_path: Any, captured: list[Any]
) -> None:
    datadir = str(tmp_path / "bank")
    svc = start(datadir, keep_snapshots=3)
    for expected in (1, 2):
        await svc.execute(Deposit("a", 1))
        assert await svc.snapshot() == expected
    with open(FileSnapshotStore(os.path.join(datadir, "snapshots")).path(2), "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"\x00" * 5)
    await svc.execute(Deposit("a", 1))
    assert await svc.snapshot() == 3  # replayed from snapshot 1
    assert "Snapshot 2 in" in texts(captured) and "cannot be loaded" in texts(captured)
    assert snapshot_model(datadir, 3).accounts == {"a": 3}
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_snapshot_that_cannot_be_written_is_a_save_failure(tmp_path: Any) -> None:
    from txjournal.snapshot.file import snapshot_name

    datadir = str(tmp_path / "bank")
    svc = start(datadir)
    await svc.execute(Deposit("a", 1))
    await svc.stopService()
    snapshots = os.path.join(datadir, "snapshots")
    # Its temp file's name is taken by a directory: the write itself fails.
    os.mkdir(os.path.join(snapshots, ".tmp-" + snapshot_name(1)))
    with pytest.raises(replayed._SaveFailed, match=f"writing snapshot 1 in {snapshots} failed"):
        replayed.write(APP, bank.name, datadir, 1)


@pytest_twisted.ensureDeferred
async def test_a_restart_in_the_same_process_still_sees_the_code_change(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, captured: list[Any]
) -> None:
    app = make_app(tmp_path, monkeypatch, "restarted_tally_app")
    datadir = str(tmp_path / "data")
    svc = JournalService(
        app.schema, datadir, snapshot_app="restarted_tally_app:schema", snapshot_on_stop=False,
    )
    svc.startService()
    await svc.execute(app.Add("k", 1))
    assert await svc.snapshot() == 1
    await svc.stopService()
    source = tmp_path / "code-restarted_tally_app" / "restarted_tally_app.py"
    source.write_text(source.read_text().replace(
        "model.get(self.key, 0) + self.n", "model.get(self.key, 0) + 2 * self.n"
    ))
    svc.startService()  # the same objects, the same code in memory
    assert await svc.execute(app.Add("k", 1)) == 2
    assert await svc.snapshot() == 2
    assert "is not the code the service runs" in texts(captured)
    assert snapshot_model(datadir, 2) == {"k": 2}
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_snapshot_file_that_cannot_be_written_is_not_retried_from_the_live_model(
    tmp_path: Any, captured: list[Any]
) -> None:
    from txjournal.snapshot.file import snapshot_name

    datadir = str(tmp_path / "bank")
    svc = start(datadir)
    await svc.execute(Deposit("a", 1))
    snapshots = os.path.join(datadir, "snapshots")
    os.mkdir(os.path.join(snapshots, ".tmp-" + snapshot_name(1)))
    with pytest.raises(SnapshotError, match=f"writing snapshot 1 in {snapshots} failed"):
        await svc.snapshot()
    assert "live model" not in texts(captured)
    await svc.stopService()


def test_checking_the_app_does_not_put_the_current_directory_on_the_path(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After twistd's --rundir the current directory may hold another copy of
    # the application, which the snapshot process would import first.
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    svc = start(str(tmp_path / "bank"), reactor=None)
    try:
        assert str(tmp_path) not in sys.path
    finally:
        svc.stopService()
