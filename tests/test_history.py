"""
Commands across time (:mod:`txjournal.history`, ``python -m txjournal check |
rebuild | replay``) on data directories written by the real service, whose
live model after every command is known (``Built.models``): every replay
must reproduce exactly those.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from bankjournal import (
    START_TIME,
    Built,
    build_bank,
    command_mix,
    files_of,
    start_bank,
    stop,
    sync_runner,
)
from history_apps import BEND_AFTER, bent, digesting, retiring
from twisted.internet.task import Clock

from examples.bank import Bank, Deposit, bank
from txjournal import JournalService, cli, history, history_cli, tools
from txjournal import record as rec
from txjournal.errors import DataDirLocked
from txjournal.history import (
    PROGRESS_EVERY,
    HistoryError,
    UnreplayableRecord,
    check,
    estimate_last_seq,
    parse_time,
    rebuild,
    replay_to,
)
from txjournal.journal.file import FileJournal
from txjournal.lock import DataDirLock
from txjournal.progress import ProgressBar, Snapshot, describe
from txjournal.snapshot import file as snapfile
from txjournal.snapshot.file import FileSnapshotStore

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
COUNT = 40
APP = "examples.bank:bank"


@pytest.fixture
def built(tmp_path: Path) -> Built:
    return build_bank(tmp_path / "bank", command_mix(COUNT), segment_size=400, snapshot_after=[15, 30])


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``python -m txjournal *argv`` in process; argparse's usage exits count as their status."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        assert isinstance(e.code, int)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m txjournal *argv`` in a child, from the repository root, as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "txjournal", *argv],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
        input=stdin,
    )


def time_of(k: int) -> float:
    """The logged time of command ``k`` of a :func:`build_bank` journal."""
    return START_TIME + 1.5 * k


def iso(seconds: float) -> str:
    return tools.iso_time(int(seconds * 1e9))


def append_raw(datadir: Path, name: str, fields: dict[str, Any], version: int = 1,
               kind: int = rec.KIND_COMMAND) -> int:
    """Append one record the way an older (or other) version of the code wrote it; its seq."""
    journal = FileJournal(str(datadir / "journal"), sync=False)
    journal.open()
    last = list(journal.replay())[-1]
    seq = journal.next_seq
    data = rec.encode_record(
        journal.salt, seq, last.time_ns + 1, name.encode(), version,
        msgpack.packb(fields, use_bin_type=True), b"", kind,
    )
    journal.append(data, seq, seq)
    journal.close()
    return seq


# -- check ----------------------------------------------------------------------------


def test_check_passes_on_a_clean_journal(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    before = files_of(built.datadir)
    calls: list[tuple[int, int | None]] = []
    report = check(bank, str(built.datadir), progress=lambda done, total: calls.append((done, total)))
    assert report.ok and report.divergence is None
    assert [(s.seq, s.matches) for s in report.snapshots] == [(15, True), (30, True)]
    assert report.snapshots[0].stored == report.snapshots[0].computed
    assert (report.total_snapshots, report.matched, report.last_seq) == (2, 2, COUNT)
    failed = sum(1 for a, b in zip(built.models, built.models[1:]) if a == b)  # rejected ones
    assert report.stats.commands == COUNT and report.stats.failed == failed
    assert calls[-1] == (COUNT, COUNT)
    assert files_of(built.datadir) == before  # read only

    code, out, _err = run_cli(capsys, "check", str(built.datadir), "--app", APP)
    assert code == 0, out
    assert "OK: all 2 snapshots match." in out
    code, out, _err = run_cli(capsys, "check", str(built.datadir), "--app", APP, "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["divergence"] is None


def test_check_names_the_first_snapshot_a_code_change_diverges_at(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    ``bent``'s deposit adds 1 extra after record 20: snapshot 15 still
    matches, snapshot 30 is the first that differs.
    """
    assert 15 < BEND_AFTER < 30
    report = check(bent, str(built.datadir))
    assert not report.ok
    assert [(s.seq, s.matches) for s in report.snapshots] == [(15, True), (30, False)]
    divergence = report.divergence
    assert divergence is not None and divergence.seq == 30
    assert divergence.path == str(built.datadir / "snapshots" / f"{30:020d}.snapshot")
    assert divergence.stored != divergence.computed
    assert report.last_seq == 30  # stops there: later comparisons only repeat it

    code, out, _err = run_cli(capsys, "check", str(built.datadir), "--app", "history_apps:bent")
    assert code == 1
    assert f"DIVERGED at snapshot 30 ({divergence.path})" in out
    assert "snapshot           15  matches" in out


def test_check_reads_version_1_snapshots(built: Built) -> None:
    """A v1 snapshot's model digest is its payload's SHA-256: the pickle replay compares to."""
    store = FileSnapshotStore(str(built.datadir / "snapshots"))
    path = Path(store.path(15))
    payload = store.load(15)
    head = snapfile._HEAD_V1.pack(
        snapfile.MAGIC, 1, 0, 0, 15, len(payload), hashlib.sha256(payload).digest()
    )
    path.write_bytes(head + snapfile._CRC_V1.pack(rec.mask(snapfile.crc32c(head)), 0) + payload)
    assert store.model_digest(15) == hashlib.sha256(payload).digest()
    report = check(bank, str(built.datadir))
    assert report.ok and [(s.seq, s.matches) for s in report.snapshots] == [(15, True), (30, True)]


def test_check_uses_the_schema_digest_function(tmp_path: Path) -> None:
    """
    Snapshots written by a schema with a ``digest`` function store that
    digest: check compares what the function says matters, and a schema
    without one (comparing pickles) sees a difference at once.
    """
    clock = Clock()
    svc: JournalService[Bank] = JournalService(
        digesting, str(tmp_path / "bank"), runner=sync_runner, reactor=clock, snapshot_on_stop=False
    )
    svc.startService()
    for i, command in enumerate(command_mix(12), 1):
        clock.advance(1)
        svc.execute(command).addErrback(lambda f: None)
        if i in (5, 10):
            svc.snapshot()
    stop(svc)
    datadir = str(tmp_path / "bank")
    stored = FileSnapshotStore(str(tmp_path / "bank" / "snapshots")).model_digest(10)
    model = replay_to(digesting, datadir, until_seq=10, use_snapshots=False).model
    assert stored == hashlib.sha256(json.dumps(sorted(model.accounts.items())).encode()).digest()
    report = check(digesting, datadir)
    assert report.ok and [s.seq for s in report.snapshots] == [5, 10]
    report = check(bank, datadir)
    assert report.divergence is not None and report.divergence.seq == 5


def test_check_without_snapshots_still_replays_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = build_bank(tmp_path / "bank", command_mix(12))
    report = check(bank, str(built.datadir))
    assert report.ok and report.snapshots == [] and report.last_seq == 12
    code, out, _err = run_cli(capsys, "check", str(built.datadir), "--app", APP)
    assert code == 0 and "No snapshots to compare with" in out


def test_check_reports_snapshots_it_cannot_compare(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = built.datadir / "snapshots" / f"{15:020d}.snapshot"
    data = bytearray(bad.read_bytes())
    data[20] ^= 0xFF  # inside the header: its checksum fails
    bad.write_bytes(bytes(data))
    report = check(bank, str(built.datadir))
    assert not report.ok and report.divergence is None
    assert [(s.seq, s.matches) for s in report.snapshots] == [(15, None), (30, True)]
    assert "checksum" in report.snapshots[0].note
    code, out, _err = run_cli(capsys, "check", str(built.datadir), "--app", APP)
    assert code == 1 and "NOT CHECKED" in out and "1 of 2 snapshots match" in out


def test_check_refuses_a_pruned_journal(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    built.segment_paths()[0].unlink()
    with pytest.raises(HistoryError, match="pruned"):
        check(bank, str(built.datadir))
    code, _out, err = run_cli(capsys, "check", str(built.datadir), "--app", APP)
    assert code == 1 and "pruned" in err


def test_usage_errors(built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("check", "rebuild", "replay"):
        code, _out, err = run_cli(capsys, sub, str(tmp_path / "missing"), "--app", APP)
        assert code == 2 and "is not a directory" in err, sub
        code, _out, err = run_cli(capsys, sub, str(built.datadir), "--app", "no_such_module:x")
        assert code == 2 and "cannot import" in err, sub
        code, _out, err = run_cli(capsys, sub, str(built.datadir))
        assert code == 2 and "--app" in err, sub
    code, _out, err = run_cli(
        capsys, "replay", str(built.datadir), "--app", APP, "--until", "3", "--until-time", "2024-01-01"
    )
    assert code == 2 and "not allowed with" in err
    code, _out, err = run_cli(capsys, "replay", str(built.datadir), "--app", APP, "--until-time", "yesterday")
    assert code == 2 and "ISO 8601" in err
    code, _out, err = run_cli(capsys, "replay", str(built.datadir), "--app", APP, "--query", "nope")
    assert code == 2 and "no query named 'nope'" in err
    code, _out, err = run_cli(
        capsys, "replay", str(built.datadir), "--app", APP, "--query", "balance", "account"
    )
    assert code == 2 and "key=value" in err


# -- unknown, retired and non-command records -----------------------------------------


@pytest.fixture
def with_bonus(tmp_path: Path) -> tuple[Built, int, Bank]:
    """
    Ten bank commands, then record 11 of a command ``bonus`` (version 3)
    that this bank does not know, then a deposit written by ``retiring``
    (which declares ``bonus`` retired). Returns the expected final model
    for code that skips ``bonus``.
    """
    built = build_bank(tmp_path / "bank", command_mix(10), segment_size=400)
    seq = append_raw(built.datadir, "bonus", {"account": "alice", "amount": 1000}, version=3)
    assert seq == 11
    svc2: JournalService[Bank] = JournalService(
        retiring, str(built.datadir), runner=sync_runner, reactor=Clock(), snapshot_on_stop=False
    )
    svc2.startService()
    svc2.execute(Deposit("alice", 5)).addErrback(lambda f: None)
    expected = copy.deepcopy(svc2.model)
    stop(svc2)
    return built, seq, expected


def test_an_unknown_command_stops_replay_naming_it(
    with_bonus: tuple[Built, int, Bank], capsys: pytest.CaptureFixture[str]
) -> None:
    built, seq, _expected = with_bonus
    before = files_of(built.datadir)
    for attempt in (
        lambda: replay_to(bank, str(built.datadir)),
        lambda: check(bank, str(built.datadir)),
        lambda: rebuild(bank, str(built.datadir)),
    ):
        with pytest.raises(UnreplayableRecord) as info:
            attempt()
        assert (info.value.seq, info.value.name, info.value.version) == (seq, "bonus", 3)
        assert "no command named 'bonus'" in str(info.value)
    assert files_of(built.datadir) == before  # rebuild changed nothing
    # The history before it is still there to look at.
    assert replay_to(bank, str(built.datadir), until_seq=10).model == built.models[10]
    for sub in ("check", "rebuild", "replay"):
        code, _out, err = run_cli(capsys, sub, str(built.datadir), "--app", APP)
        assert code == 1, sub
        assert "cannot replay record 11: command 'bonus' version 3" in err, sub
        assert "retire" in err
    assert files_of(built.datadir) == before


def test_a_retired_command_is_skipped_on_purpose(with_bonus: tuple[Built, int, Bank]) -> None:
    built, _seq, expected = with_bonus
    point = replay_to(retiring, str(built.datadir))
    assert point.model == expected and point.seq == 12
    assert point.stats.retired == 1 and point.stats.records == 12 and point.stats.commands == 11
    report = check(retiring, str(built.datadir))
    assert report.ok and report.last_seq == 12
    rebuilt = rebuild(retiring, str(built.datadir))
    assert rebuilt.seq == 12 and rebuilt.stats.retired == 1


def test_query_audit_records_are_skipped_and_inspect_shows_their_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = build_bank(tmp_path / "bank", command_mix(6))
    svc = start_bank(built.datadir, audit_queries=True)
    svc.query("total")
    svc.query_as("auditor", "accounts", {}).addErrback(lambda f: None)
    stop(svc)
    records = list(tools.inspect(str(built.datadir)))
    assert [(r["seq"], r["kind"]) for r in records[-3:]] == [(6, "command"), (7, "query"), (8, "query")]
    assert (records[-1]["command"], records[-1]["user"], records[-1]["fields"]) == ("accounts", "auditor", {})
    assert [r["seq"] for r in tools.inspect(str(built.datadir), kind="query")] == [7, 8]
    assert len(list(tools.inspect(str(built.datadir), kind="command"))) == 6
    code, out, _err = run_cli(capsys, "inspect", str(built.datadir), "--from", "7")
    assert code == 0 and "query:total v1" in out and "auditor" in out

    point = replay_to(bank, str(built.datadir))
    assert point.model == built.models[6] and point.seq == 8
    assert (point.stats.commands, point.stats.other) == (6, 2)
    assert check(bank, str(built.datadir)).ok


# -- rebuild --------------------------------------------------------------------------


def test_rebuild_writes_a_snapshot_the_service_loads(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    old = {p.name: p.read_bytes() for p in built.snapshot_paths()}
    journal_before = {p.name: p.read_bytes() for p in built.segment_paths()}
    calls: list[tuple[int, int | None]] = []
    report = rebuild(bank, str(built.datadir), progress=lambda d, t: calls.append((d, t)))
    assert report.seq == COUNT and calls[-1] == (COUNT, COUNT)
    assert report.stats.commands == COUNT
    assert report.snapshot == str(built.datadir / "snapshots" / f"{COUNT:020d}.snapshot")
    # The old snapshots moved aside, intact; the journal untouched.
    assert report.backup_dir is not None
    backup = Path(report.backup_dir)
    assert backup.parent == built.datadir and backup.name.startswith("snapshots-before-rebuild-")
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == old
    assert [m.backup for m in report.moved] == [str(backup / name) for name in sorted(old)]
    assert [p.name for p in built.snapshot_paths()] == [f"{COUNT:020d}.snapshot"]
    assert {p.name: p.read_bytes() for p in built.segment_paths()} == journal_before
    assert oct(backup.stat().st_mode & 0o777) == oct(0o700)
    assert FileSnapshotStore(str(built.datadir / "snapshots")).model_digest(COUNT).hex() == report.digest

    svc = start_bank(built.datadir)
    try:
        assert svc.loaded_snapshot_seq == COUNT and svc.replayed == 0
        assert svc.model == built.models[-1]
    finally:
        stop(svc)
    assert check(bank, str(built.datadir)).ok

    code, out, _err = run_cli(capsys, "rebuild", str(built.datadir), "--app", APP)
    assert code == 0
    assert f"Replayed {COUNT} commands in " in out and "commands/s" in out
    assert "Moved 1 old snapshot(s)" in out


def test_rebuild_with_changed_code_makes_its_model_the_real_one(built: Built) -> None:
    """After a deliberate change of behaviour, rebuild makes check pass again."""
    assert not check(bent, str(built.datadir)).ok
    rebuild(bent, str(built.datadir))
    assert check(bent, str(built.datadir)).ok
    svc = start_bank(built.datadir)
    try:
        replayed = replay_to(bent, str(built.datadir), use_snapshots=False).model
        assert svc.model == replayed != built.models[-1]
    finally:
        stop(svc)


def test_rebuild_replaces_a_snapshot_of_the_same_seq(tmp_path: Path) -> None:
    """A clean shutdown snapshots the last record: the rebuilt one takes its name."""
    built = build_bank(tmp_path / "bank", command_mix(12), snapshot_after=[12])
    report = rebuild(bank, str(built.datadir))
    assert report.seq == 12 and [Path(m.path).name for m in report.moved] == [f"{12:020d}.snapshot"]
    assert [p.name for p in built.snapshot_paths()] == [f"{12:020d}.snapshot"]
    svc = start_bank(built.datadir)
    try:
        assert svc.loaded_snapshot_seq == 12 and svc.model == built.models[-1]
    finally:
        stop(svc)


def test_rebuild_refuses_while_the_service_runs(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files_of(built.datadir)
    svc = start_bank(built.datadir)
    try:
        with pytest.raises(DataDirLocked):
            rebuild(bank, str(built.datadir))
        code, _out, err = run_cli(capsys, "rebuild", str(built.datadir), "--app", APP)
        assert code == 1 and "locked" in err and f"pid {os.getpid()}" in err
    finally:
        stop(svc)
    assert files_of(built.datadir) == before
    lock = DataDirLock(str(built.datadir))
    lock.acquire()  # rebuild let go of the lock when it refused
    lock.release()


def test_rebuild_refuses_what_would_lose_history(built: Built, tmp_path: Path) -> None:
    # A snapshot beyond the journal's end: records are missing.
    segments = built.segment_paths()
    for path in segments:
        if int(path.name.split(".")[0]) > 25:
            path.unlink()  # the journal now ends before snapshot 30
    before = files_of(built.datadir)
    with pytest.raises(HistoryError, match="covers more than the journal"):
        rebuild(bank, str(built.datadir))
    assert files_of(built.datadir) == before
    # A pruned journal cannot be replayed from 1.
    segments[0].unlink()
    with pytest.raises(HistoryError, match="pruned"):
        rebuild(bank, str(built.datadir))
    # An empty journal: nothing to rebuild.
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    with pytest.raises(HistoryError, match="empty"):
        rebuild(bank, str(empty))


# -- replay ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_snapshots", [True, False])
def test_replay_until_seq_gives_the_model_of_that_moment(built: Built, use_snapshots: bool) -> None:
    before = files_of(built.datadir)
    for k in (0, 1, 14, 15, 16, 29, 30, 31, COUNT):
        point = replay_to(bank, str(built.datadir), until_seq=k, use_snapshots=use_snapshots)
        assert point.model == built.models[k], k
        assert point.seq == k
        expected_snapshot = max((s for s in (15, 30) if s <= k), default=0) if use_snapshots else 0
        assert point.snapshot == expected_snapshot, k
        assert point.stats.records == k - expected_snapshot
        assert not point.journal_end or k == COUNT
    point = replay_to(bank, str(built.datadir), until_seq=COUNT + 5, use_snapshots=use_snapshots)
    assert point.model == built.models[-1] and point.seq == COUNT and point.journal_end
    assert files_of(built.datadir) == before


def test_replay_until_time_gives_the_model_of_that_moment(built: Built) -> None:
    for k in (0, 1, 15, 16, 22, 30, COUNT):
        for offset in (0.0, 0.7):  # at the command's logged time, and between two commands
            until = parse_time(iso(time_of(k) + offset))
            point = replay_to(bank, str(built.datadir), until_time_ns=until)
            assert point.model == built.models[k], (k, offset)
            assert point.seq == k
            if k:
                assert point.time_ns is not None and point.time_ns <= until
    # Snapshot 30 covers records after the time of record 22: it is not used.
    point = replay_to(bank, str(built.datadir), until_time_ns=parse_time(iso(time_of(22))))
    assert point.snapshot == 15 and [s for s, _r in point.skipped_snapshots] == [30]


def test_replay_falls_back_to_an_older_snapshot(built: Built) -> None:
    bad = built.datadir / "snapshots" / f"{30:020d}.snapshot"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF  # the payload: its SHA-256 fails
    bad.write_bytes(bytes(data))
    point = replay_to(bank, str(built.datadir), until_seq=35)
    assert point.model == built.models[35] and point.snapshot == 15
    ((seq, reason),) = point.skipped_snapshots
    assert seq == 30 and "SHA-256" in reason


def test_replay_query_prints_json_in_a_subprocess(built: Built) -> None:
    proc = run_subprocess(
        "replay", str(built.datadir), "--app", APP, "--until", "20", "--query", "accounts"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == built.models[20].accounts
    assert "Model as of sequence number 20" in proc.stderr
    account = sorted(built.models[20].accounts)[0]
    at = iso(time_of(12))
    proc = run_subprocess(
        "replay", str(built.datadir), "--app", APP, "--until-time", at,
        "--query", "balance", f"account={account}",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == built.models[12].accounts.get(account)
    # A query that raises on that model: exit 1, the exception named.
    proc = run_subprocess(
        "replay", str(built.datadir), "--app", APP, "--until", "0", "--query", "balance", "account=zed"
    )
    assert proc.returncode == 1 and "UnknownAccount" in proc.stderr and proc.stdout == ""


def test_replay_bench_prints_a_row_per_command(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "replay", str(built.datadir), "--app", APP, "--bench")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["COMMAND", "COUNT", "FAILED", "SECONDS", "COMMANDS/S", "µS/COMMAND"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.split()[0].isalpha()}
    names = [type(c).__name__ for c in built.commands]
    expected = {
        "deposit": names.count("Deposit"), "withdraw": names.count("Withdraw"),
        "transfer": names.count("Transfer"), "open": names.count("OpenAccount"),
    }
    for name, count in expected.items():
        if count:
            assert int(rows[name][1].replace(",", "")) == count, name
    assert int(rows["TOTAL"][1]) == COUNT
    # --bench replays from 1 so that every command is timed.
    assert "an empty model + 40 commands" in err


def test_replay_shell_has_the_model(built: Built) -> None:
    proc = run_subprocess(
        "replay", str(built.datadir), "--app", APP, "--until", "17", "--shell",
        stdin="print('ACCOUNTS', sorted(model.accounts.items()))\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ACCOUNTS {sorted(built.models[17].accounts.items())}" in proc.stdout
    assert "'model' is the model" in proc.stderr


def test_replay_without_action_prints_a_summary(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_cli(capsys, "replay", str(built.datadir), "--app", APP, "--until", "50")
    assert code == 0
    assert out.startswith(f"Model as of sequence number {COUNT} (logged {iso(time_of(COUNT))}): snapshot 30")
    assert f"the journal ends at {COUNT}, before 50" in out


# -- progress -------------------------------------------------------------------------


def test_estimate_last_seq(built: Built, tmp_path: Path) -> None:
    journal = FileJournal(str(built.datadir / "journal"), readonly=True)
    journal.open()
    assert estimate_last_seq(journal) == COUNT
    empty = FileJournal(str(tmp_path / "nothing"), readonly=True)
    empty.open()
    assert estimate_last_seq(empty) is None


def test_progress_is_reported_every_few_thousand_records(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert PROGRESS_EVERY >= 1000  # a call per record would cost more than the record
    monkeypatch.setattr(history, "PROGRESS_EVERY", 16)
    calls: list[tuple[int, int | None]] = []
    replay_to(bank, str(built.datadir), use_snapshots=False, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(16, COUNT), (32, COUNT), (COUNT, COUNT)]
    calls.clear()
    replay_to(bank, str(built.datadir), until_seq=35, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(5, 5)]  # from snapshot 30: five records expected


def test_describe() -> None:
    text = describe(Snapshot(250, 1000, 2.0), "rebuild", width=10)
    assert text == "rebuild  [##........]   25.0%  250/1,000 records  125/s  ETA 0:06"
    assert describe(Snapshot(1000, 1000, 75.0), bar=False) == (
        "100.0%  1,000/1,000 records  13/s  1:15 elapsed"
    )
    assert describe(Snapshot(5, None, 0.0)) == "5 records"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_on_a_terminal_redraws_in_place() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(out, "check", tty=True, clock=clock)
    bar(0, 100)
    clock.now += 0.05
    bar(10, 100)  # too soon: not drawn
    assert out.getvalue().count("\r") == 1 and "\n" not in out.getvalue()
    clock.now += 0.1
    bar(50, 100)
    assert out.getvalue().count("\r") == 2 and "50/100" in out.getvalue()
    bar(100, 100)  # throttled, but finish shows the final figures
    bar.finish()
    assert out.getvalue().endswith("100/100 records  667/s  0:00 elapsed\x1b[K\n")


def test_progress_bar_elsewhere_writes_a_line_now_and_then() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(out, "rebuild", tty=False, log_interval=10.0, clock=clock)
    bar(10, 100)
    clock.now += 5
    bar(20, 100)
    assert out.getvalue() == ""  # short runs stay silent
    clock.now += 5
    bar(40, 100)
    assert out.getvalue() == "rebuild   40.0%  40/100 records  4/s  ETA 0:15\n"
    bar.finish()
    assert "\r" not in out.getvalue() and out.getvalue().count("\n") == 1
    quiet = ProgressBar(out, tty=False, log_interval=None, clock=clock)
    clock.now += 100
    quiet(99, 100)
    assert out.getvalue().count("\n") == 1


def test_progress_goes_to_stderr_only_on_a_terminal(
    built: Built, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(capsys, "check", str(built.datadir), "--app", APP)
    assert code == 0 and "\r" not in err and "\r" not in out

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert history_cli.run_check(cli.build_parser().parse_args(
        ["check", str(built.datadir), "--app", APP]
    )) == 0
    assert "\r" in terminal.getvalue() and f"{COUNT}/{COUNT} records" in terminal.getvalue()
    assert "\r" not in capsys.readouterr().out


def test_parse_time() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == 1_000_000_999
    assert parse_time("1970-01-01T00:00:01") == 1_000_000_999  # no zone: UTC
    assert parse_time("1970-01-01T01:00:01+01:00") == 1_000_000_999
    assert parse_time("2023-11-14T22:13:20.123456Z") == 1_700_000_000_123_456_999
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("last tuesday")


def test_check_after_adding_a_digest_function_compares_like_with_like(built: Built) -> None:
    """
    Snapshots written before the schema had a ``digest`` function store the
    pickle's digest: check must compare those with the replayed model's
    pickle, not report a divergence because the function was added.
    """
    report = check(digesting, str(built.datadir))
    assert report.ok and report.divergence is None
    assert [(s.seq, s.matches) for s in report.snapshots] == [(15, True), (30, True)]
