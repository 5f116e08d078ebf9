"""
The operator tools (:mod:`txjournal.tools`, ``python -m txjournal verify |
inspect | repair``) on data directories written by the real service, then
damaged the way disks and crashes damage them.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bankjournal import (
    START_TIME,
    Built,
    build_bank,
    command_mix,
    files_of,
    locate_records,
    start_bank,
    stop,
)

from examples.bank import Deposit
from txjournal import cli, tools_cli
from txjournal import record as rec
from txjournal.errors import DataDirLocked, JournalCorrupt, RecoveryError
from txjournal.fs import OSFileSystem
from txjournal.journal.file import FileJournal
from txjournal.lock import DataDirLock
from txjournal.snapshot.file import FileSnapshotStore
from txjournal.tools import (
    NotADataDir,
    RepairRefused,
    StartupCheck,
    inspect,
    repair,
    to_jsonable,
    verify,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
COUNT = 40


@pytest.fixture
def built(tmp_path: Path) -> Built:
    return build_bank(tmp_path / "bank", command_mix(COUNT), segment_size=400, snapshot_after=[15, 30])


@pytest.fixture
def broken(tmp_path: Path) -> tuple[Built, Any]:
    """
    A journal whose record 16 (mid-file, in the third segment) is damaged,
    with a snapshot at 10 only, so that start-up refuses: replay from 11
    runs into the damage.
    """
    built = build_bank(tmp_path / "bank", command_mix(COUNT), segment_size=400, snapshot_after=[10])
    target = middle_record(built)
    flip(target.path, target.end - 3)
    with pytest.raises(JournalCorrupt):
        start_bank(built.datadir)
    return built, target


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``python -m txjournal *argv`` in process; argparse's usage exits count as their status."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        assert isinstance(e.code, int)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def flip(path: Path, offset: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def journal_seqs(datadir: Path) -> list[int]:
    journal = FileJournal(str(datadir / "journal"), readonly=True)
    journal.open()
    return [r.seq for r in journal.replay()]


def middle_record(built: Built) -> Any:
    """The third record of the third segment: damage there is mid-file, after snapshot 15."""
    records = locate_records(built)
    third = built.segment_paths()[2]
    located = [r for r in records if r.path == third][2]
    assert 10 < located.seq < 30
    return located


# -- verify ---------------------------------------------------------------------------


def test_verify_clean_directory(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    report = verify(str(built.datadir))
    assert report.ok and report.problems == [] and report.journal_complete
    assert (report.records, report.first_seq, report.last_seq) == (COUNT, 1, COUNT)
    segments = built.segment_paths()
    assert [s.path for s in report.segments] == [str(p) for p in segments]
    assert len(segments) >= 4
    # Contiguous, every record counted once, sizes as on disk.
    expected_first = 1
    for s in report.segments:
        assert s.verified and not s.damaged
        assert s.first_seq == expected_first and s.last_seq is not None
        assert s.records == s.last_seq - s.first_seq + 1
        assert s.size == os.path.getsize(s.path)
        expected_first = s.last_seq + 1
    assert expected_first == COUNT + 1
    assert [(s.seq, s.size, s.ok) for s in report.snapshots] == [
        (seq, os.path.getsize(built.datadir / "snapshots" / f"{seq:020d}.snapshot"), True)
        for seq in (15, 30)
    ]
    journal = FileJournal(str(built.datadir / "journal"), readonly=True)
    journal.open()
    list(journal.replay())
    assert report.journal_id == journal.journal_id
    assert report.locked_by is None and report.temp_files == []

    code, out, _err = run_cli(capsys, "verify", str(built.datadir))
    assert code == 0
    assert f"{COUNT} records, seq 1..{COUNT}, {len(segments)} segments" in out
    assert "OK: no problems found." in out
    code, out, _err = run_cli(capsys, "verify", str(built.datadir), "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["records"] == COUNT
    assert data["journal_id"] == f"{journal.journal_id:016x}"


def test_verify_reports_torn_tail_as_warning_and_changes_nothing(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    last = built.segment_paths()[-1]
    good = last.stat().st_size
    with open(last, "ab") as f:
        f.write(b"\x30\x00\x00\x00\x11\x22")  # a record that never finished
    before = files_of(built.datadir)
    report = verify(str(built.datadir))
    assert report.records == COUNT and report.journal_complete
    (problem,) = report.problems
    assert (problem.path, problem.offset, problem.seq) == (str(last), good, COUNT + 1)
    assert problem.severity == "warning" and "torn write" in problem.message
    assert "6 bytes" in problem.message
    assert report.errors == [] and not report.ok
    assert files_of(built.datadir) == before  # read-only: the tail is still there
    code, out, _err = run_cli(capsys, "verify", str(built.datadir))
    assert code == 1 and "WARNING" in out and str(last) in out


def test_verify_names_file_offset_seq_and_command_of_mid_file_damage(
    broken: tuple[Built, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    built, target = broken  # a byte flipped inside the fields of record 16
    report = verify(str(built.datadir))
    assert report.startup is None  # no snapshot past the damage: start-up meets it too
    (problem,) = report.problems
    assert (problem.path, problem.offset, problem.seq) == (str(target.path), target.offset, target.seq)
    assert problem.severity == "error" and "checksum mismatch" in problem.message
    assert problem.command == target.name and "unverified" in problem.message
    assert not report.journal_complete
    assert (report.records, report.last_seq) == (target.seq - 1, target.seq - 1)
    damaged = [s for s in report.segments if s.damaged]
    assert [s.path for s in damaged] == [str(target.path)]
    index = report.segments.index(damaged[0])
    assert all(s.verified for s in report.segments[:index])
    assert not any(s.verified for s in report.segments[index:])
    code, out, _err = run_cli(capsys, "verify", str(built.datadir))
    assert code == 1
    assert f"{target.path} at offset {target.offset} (seq {target.seq}, command {target.name!r})" in out
    assert "repair" in out


def test_verify_says_whether_start_up_reads_the_damage(built: Built) -> None:
    """
    Damage in history that snapshot 30 covers does not stop start-up, which
    replays from 31: verify says so (and checks that part), so nobody cuts
    away good records to repair a directory that starts fine.
    """
    target = middle_record(built)  # record 16
    later = [r for r in locate_records(built) if r.seq == 37][0]
    flip(target.path, target.end - 3)
    report = verify(str(built.datadir))
    (problem,) = report.problems
    assert problem.seq == target.seq and "start-up is not affected" in problem.message
    assert report.startup == StartupCheck(snapshot=30, last_seq=COUNT, ok=True)
    svc = start_bank(built.datadir)  # and indeed it starts
    assert svc.loaded_snapshot_seq == 30 and svc.model == built.models[COUNT]
    stop(svc)

    # Damage where start-up reads too: a second problem, and start-up refuses there.
    flip(later.path, later.end - 3)
    report = verify(str(built.datadir))
    first, second = report.problems
    assert "start-up is not affected" not in first.message
    assert (second.path, second.offset, second.seq) == (str(later.path), later.offset, 37)
    assert "as start-up does" in second.message
    assert report.startup == StartupCheck(snapshot=30, last_seq=36, ok=False)
    with pytest.raises(JournalCorrupt) as info:
        start_bank(built.datadir)
    assert (info.value.path, info.value.offset) == (second.path, second.offset)


def test_verify_reports_the_expected_seq_when_the_seq_field_is_damaged(built: Built) -> None:
    """
    The record's own seq field may be the damaged part: verify names the
    sequence number that belongs at that offset, and shows what the field reads.
    """
    target = middle_record(built)
    flip(target.path, target.offset + rec.PREFIX_SIZE, 0x40)
    (problem,) = verify(str(built.datadir)).problems
    assert (problem.offset, problem.seq) == (target.offset, target.seq)
    assert f"field reads {target.seq ^ 0x40}" in problem.message


def test_verify_bad_snapshots_named_with_reason(built: Built) -> None:
    snap15, snap30 = built.snapshot_paths()
    flip(snap30, snap30.stat().st_size - 1)
    report = verify(str(built.datadir))
    (problem,) = report.problems
    assert problem.path == str(snap30) and problem.seq == 30
    assert "SHA-256" in problem.message and problem.severity == "error"
    assert [s.ok for s in report.snapshots] == [True, False]
    # An older snapshot cut short: start-up still has nothing better than
    # replaying from scratch, so both count as errors now.
    snap15.write_bytes(snap15.read_bytes()[:-5])
    problems = {p.path: p for p in verify(str(built.datadir)).problems}
    assert "truncated" in problems[str(snap15)].message
    assert {p.severity for p in problems.values()} == {"error"}


def test_verify_older_bad_snapshot_is_a_warning(built: Built) -> None:
    snap15, _snap30 = built.snapshot_paths()
    snap15.write_bytes(snap15.read_bytes()[:50])
    (problem,) = verify(str(built.datadir)).problems
    assert problem.path == str(snap15) and problem.severity == "warning"
    assert "truncated" in problem.message


def test_verify_never_unpickles_snapshots(built: Built) -> None:
    """Verify needs no application code: a payload that is not even a pickle is intact."""
    store = FileSnapshotStore(str(built.datadir / "snapshots"))
    store.save(35, b"not a pickle, and verify must not care")
    report = verify(str(built.datadir))
    assert report.ok
    assert [s.seq for s in report.snapshots] == [15, 30, 35]


def test_verify_snapshot_beyond_journal_end(built: Built) -> None:
    store = FileSnapshotStore(str(built.datadir / "snapshots"))
    path = store.save(COUNT + 5, b"payload")
    (problem,) = verify(str(built.datadir)).problems
    assert (problem.path, problem.seq, problem.severity) == (path, COUNT + 5, "error")
    assert f"journal ends at {COUNT}" in problem.message


def test_verify_missing_middle_segment(built: Built) -> None:
    segments = built.segment_paths()
    gone = segments[2]
    first_missing = int(gone.name.split(".")[0])
    gone.unlink()
    report = verify(str(built.datadir))
    (problem,) = report.problems
    assert (problem.path, problem.offset, problem.seq) == (str(segments[3]), 0, first_missing)
    assert "missing" in problem.message
    assert report.last_seq == first_missing - 1


def test_verify_pruned_journal_needs_a_covering_snapshot(built: Built) -> None:
    """A journal pruned up to a snapshot is fine; without that snapshot it cannot rebuild."""
    segments = built.segment_paths()
    segments[0].unlink()
    report = verify(str(built.datadir))
    assert report.ok and report.first_seq == int(segments[1].name.split(".")[0])
    for snap in built.snapshot_paths():
        snap.unlink()
    (problem,) = verify(str(built.datadir)).problems
    assert problem.path == str(segments[1]) and "no valid snapshot covers" in problem.message


def test_verify_shows_lock_holder_and_temp_files(built: Built) -> None:
    (built.datadir / "journal" / ".tmp-00000000000000000099.log").write_bytes(b"TXJ")
    lock = DataDirLock(str(built.datadir))
    lock.acquire()
    try:
        report = verify(str(built.datadir))
    finally:
        lock.release()
    assert report.ok
    assert report.locked_by == f"pid {os.getpid()} on {os.uname().nodename}"
    assert report.temp_files == [str(built.datadir / "journal" / ".tmp-00000000000000000099.log")]


def test_verify_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(NotADataDir):
        verify(str(tmp_path / "missing"))
    code, _out, err = run_cli(capsys, "verify", str(tmp_path / "missing"))
    assert code == 2 and "is not a directory" in err


def test_verify_empty_directory(tmp_path: Path) -> None:
    report = verify(str(tmp_path))
    assert report.ok and report.records == 0 and report.segments == []
    assert report.journal_id is None and report.first_seq is None


# -- inspect --------------------------------------------------------------------------


def test_inspect_decodes_records_without_application_code(built: Built) -> None:
    records = list(inspect(str(built.datadir)))
    assert [r["seq"] for r in records] == list(range(1, COUNT + 1))
    for i, (r, command) in enumerate(zip(records, built.commands), 1):
        fields = dict(vars(command))  # a dataclass: its fields are its attributes
        assert r["fields"] == fields
        assert r["version"] == 1 and r["kind"] == "command" and r["user"] is None
        assert r["time_ns"] == int((START_TIME + 1.5 * i) * 1e9)
        parsed = datetime.datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
        assert parsed == datetime.datetime.fromtimestamp(START_TIME + 1.5 * i, datetime.UTC)
    names = {"deposit", "withdraw", "transfer", "open"}
    assert {r["command"] for r in records} <= names


def test_inspect_filters(built: Built) -> None:
    d = str(built.datadir)
    assert [r["seq"] for r in inspect(d, from_seq=12, to_seq=17)] == list(range(12, 18))
    assert [r["seq"] for r in inspect(d, from_seq=COUNT - 1)] == [COUNT - 1, COUNT]
    assert [r["seq"] for r in inspect(d, to_seq=3)] == [1, 2, 3]
    assert list(inspect(d, from_seq=20, to_seq=19)) == []
    assert list(inspect(d, from_seq=COUNT + 1)) == []
    deposits = [r["seq"] for r in inspect(d, command="deposit")]
    expected = [i for i, c in enumerate(built.commands, 1) if isinstance(c, Deposit)]
    assert deposits == expected and deposits
    assert [r["seq"] for r in inspect(d, from_seq=10, to_seq=30, command="deposit")] == [
        s for s in expected if 10 <= s <= 30
    ]
    # A pruned journal: --from below its start shows what there is.
    first_segment = built.segment_paths()[0]
    first_segment.unlink()
    start = int(built.segment_paths()[0].name.split(".")[0])
    assert next(inspect(d, from_seq=1))["seq"] == start


def test_inspect_streams_and_stops_at_damage(built: Built) -> None:
    target = middle_record(built)
    flip(target.path, target.end - 3)
    records = inspect(str(built.datadir))
    assert iter(records) is records  # a stream, not a list
    # Records before the damage come out, and reading stops before it if asked.
    assert [r["seq"] for r in inspect(str(built.datadir), to_seq=target.seq - 1)] == list(
        range(1, target.seq)
    )
    seen = []
    with pytest.raises(JournalCorrupt) as info:
        for r in records:
            seen.append(r["seq"])
    assert seen == list(range(1, target.seq))
    assert info.value.path == str(target.path) and info.value.offset == target.offset


def _raw_journal(directory: Path) -> None:
    """A journal of commands no schema knows, with bytes, users and odd keys."""
    journal = FileJournal(str(directory / "journal"), sync=False)
    journal.open()
    assert list(journal.replay()) == []
    import msgpack

    rows: list[tuple[str, dict[Any, Any], str]] = [
        ("blob.put", {"key": "k1", "data": b"\x00\xffbinary"}, "alice"),
        ("blob.put", {"key": "k2", "data": b"", "meta": {1: b"x", "n": [1, 2.5, None]}}, ""),
        ("blob.del", {"key": "k1"}, "bob"),
    ]
    for seq, (name, fields, user) in enumerate(rows, 1):
        data = rec.encode_record(
            journal.salt, seq, 1_700_000_000_123_456_789 + seq, name.encode(), 3,
            msgpack.packb(fields, use_bin_type=True), user.encode(),
        )
        journal.append(data, seq, seq)
    journal.close()


def test_inspect_cli_json_lines_in_a_subprocess(tmp_path: Path) -> None:
    _raw_journal(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "txjournal", "inspect", str(tmp_path), "--json", "--from", "2"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [
        {
            "seq": 2, "time": "2023-11-14T22:13:20.123456Z", "time_ns": 1_700_000_000_123_456_791,
            "command": "blob.put", "version": 3, "kind": "command", "user": None,
            "fields": {"key": "k2", "data": {"base64": ""},
                       "meta": {"1": {"base64": "eA=="}, "n": [1, 2.5, None]}},
        },
        {
            "seq": 3, "time": "2023-11-14T22:13:20.123456Z", "time_ns": 1_700_000_000_123_456_792,
            "command": "blob.del", "version": 3, "kind": "command", "user": "bob",
            "fields": {"key": "k1"},
        },
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "txjournal", "inspect", str(tmp_path), "--command", "blob.put"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    header, first, second = proc.stdout.splitlines()
    assert header.split()[:3] == ["SEQ", "TIME", "(UTC)"]
    assert first.split()[:5] == ["1", "2023-11-14T22:13:20.123456Z", "blob.put", "v3", "alice"]
    assert "data=b'\\x00\\xffbinary'" in first
    assert second.split()[0] == "2" and " - " in second


def test_to_jsonable() -> None:
    import msgpack

    assert to_jsonable({b"k": b"\x01", 2: [b"", (1,)], None: msgpack.ExtType(5, b"z")}) == {
        "base64:aw==": {"base64": "AQ=="},
        "2": [{"base64": ""}, [1]],
        "null": {"ext": 5, "base64": "eg=="},
    }


def test_inspect_cli_reports_damage_after_the_records_before_it(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    target = middle_record(built)
    flip(target.path, target.end - 3)
    code, out, err = run_cli(capsys, "inspect", str(built.datadir), "--json")
    assert code == 1
    assert [json.loads(line)["seq"] for line in out.splitlines()] == list(range(1, target.seq))
    assert str(target.path) in err and f"offset {target.offset}" in err
    code, _out, err = run_cli(capsys, "inspect", str(built.datadir / "nope"))
    assert code == 2 and "not a directory" in err


# -- repair ---------------------------------------------------------------------------


def test_repair_after_middle_corruption(
    broken: tuple[Built, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    built, target = broken
    keep = target.seq - 1
    before = files_of(built.datadir)
    segments = built.segment_paths()
    later = segments[segments.index(target.path) + 1 :]
    assert len(later) >= 2

    code, out, err = run_cli(capsys, "repair", str(built.datadir), "--truncate-after", str(keep), "--yes")
    assert code == 0, err
    assert f"keeping records 1..{keep}" in out and "Done." in out

    # The service starts and holds exactly records 1..keep: the model after them.
    assert journal_seqs(built.datadir) == list(range(1, keep + 1))
    svc = start_bank(built.datadir)
    assert svc.model == built.models[keep]
    assert svc.loaded_snapshot_seq == 10 and svc.replayed == keep - 10
    assert svc.execute(Deposit("alice", 1)).called
    stop(svc)
    assert journal_seqs(built.datadir) == list(range(1, keep + 2))
    assert verify(str(built.datadir)).ok

    # Everything removed is in the backup, byte for byte, and the manifest says where from.
    (backup,) = [p for p in built.datadir.iterdir() if p.name.startswith("repair-backup-")]
    rel_target = str(target.path.relative_to(built.datadir))
    tail = backup / "journal" / f"{target.path.name}.from-{target.offset}"
    assert before[rel_target][: target.offset] + tail.read_bytes() == before[rel_target]
    for seg in later:
        assert not seg.exists()
        assert (backup / "journal" / seg.name).read_bytes() == before[str(seg.relative_to(built.datadir))]
    manifest = json.loads((backup / "MANIFEST.json").read_text())
    assert manifest["truncate_after"] == keep
    assert {e["path"] for e in manifest["entries"]} == {
        rel_target, *(str(s.relative_to(built.datadir)) for s in later)
    }
    assert os.stat(backup).st_mode & 0o077 == 0


def test_repair_moves_snapshots_beyond_the_cut(built: Built) -> None:
    """
    A point-in-time rollback (no damage needed): snapshot 30 covers records
    that go, and left in place it would make start-up refuse.
    """
    before = files_of(built.datadir)
    report = repair(str(built.datadir), 20)
    snap30 = "snapshots/00000000000000000030.snapshot"
    assert [m.path for m in report.moved_snapshots] == [str(built.datadir / snap30)]
    assert report.backup_dir is not None
    assert Path(report.backup_dir, snap30).read_bytes() == before[snap30]
    assert not (built.datadir / snap30).exists()
    svc = start_bank(built.datadir)
    assert svc.model == built.models[20] and svc.loaded_snapshot_seq == 15
    stop(svc)
    # Why it had to go: put it back and start-up refuses.
    (built.datadir / snap30).write_bytes(before[snap30])
    with pytest.raises(RecoveryError, match=r"snapshot 30 .*covers more"):
        start_bank(built.datadir)


def test_repair_refuses_while_locked(
    broken: tuple[Built, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    built, target = broken
    before = files_of(built.datadir)
    holder = DataDirLock(str(built.datadir))
    holder.acquire()
    try:
        for dry_run in (False, True):
            with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}"):
                repair(str(built.datadir), target.seq - 1, dry_run=dry_run)
        code, _out, err = run_cli(
            capsys, "repair", str(built.datadir), "--truncate-after", str(target.seq - 1), "--yes"
        )
        assert code == 1 and "locked" in err and "nothing was changed" in err
        assert files_of(built.datadir) == before
    finally:
        holder.release()
    report = repair(str(built.datadir), target.seq - 1)
    assert report.backup_dir is not None and not report.dry_run


def test_repair_dry_run_changes_nothing(
    broken: tuple[Built, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    built, target = broken
    FileSnapshotStore(str(built.datadir / "snapshots")).save(30, b"covers what would go")
    (built.datadir / "LOCK").unlink()
    before = files_of(built.datadir)
    listing = sorted(p.name for p in built.datadir.iterdir())
    code, out, _err = run_cli(capsys, "repair", str(built.datadir), "--truncate-after", str(target.seq - 1))
    assert code == 1
    assert f"{target.path}: would be cut at offset {target.offset}" in out
    segments = built.segment_paths()
    for seg in segments[segments.index(target.path) + 1 :]:
        assert f"{seg}: segment would be removed" in out
    assert "00000000000000000030.snapshot: snapshot would be removed" in out
    assert "Nothing was changed" in out and "--yes" in out
    assert files_of(built.datadir) == before
    assert sorted(p.name for p in built.datadir.iterdir()) == listing  # no LOCK, no backup
    report = repair(str(built.datadir), target.seq - 1, dry_run=True)
    assert report.dry_run and report.backup_dir is None and report.kept_records == target.seq - 1
    assert files_of(built.datadir) == before


def test_repair_refuses_to_keep_damage(
    broken: tuple[Built, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    built, target = broken
    before = files_of(built.datadir)
    with pytest.raises(RepairRefused) as info:
        repair(str(built.datadir), target.seq + 2)
    message = str(info.value)
    assert str(target.path) in message and f"offset {target.offset}" in message
    assert f"--truncate-after {target.seq - 1} or less" in message
    assert files_of(built.datadir) == before
    code, _out, err = run_cli(capsys, "repair", str(built.datadir), "--truncate-after", "1000", "--yes")
    assert code == 1 and "nothing was changed" in err
    code, _out, err = run_cli(capsys, "repair", str(built.datadir), "--truncate-after", "-3")
    assert code == 2
    code, _out, err = run_cli(capsys, "repair", str(built.datadir / "nope"), "--truncate-after", "3")
    assert code == 2 and "not a directory" in err


def test_repair_refusals_point_at_a_cut_that_works(built: Built) -> None:
    segments = built.segment_paths()
    flip(segments[3], 9)  # the format version in the fourth segment's header
    start = int(segments[3].name.split(".")[0])
    with pytest.raises(RepairRefused, match=f"bad segment header .*--truncate-after {start - 1} or less"):
        repair(str(built.datadir), start + 2)
    repair(str(built.datadir), start - 1)
    svc = start_bank(built.datadir)
    assert svc.model == built.models[start - 1]
    stop(svc)
    flip(segments[0], 2)  # the magic of the first: nothing to keep
    with pytest.raises(RepairRefused, match="first segment: not even the journal's identity"):
        repair(str(built.datadir), 0)


def test_repair_past_the_end_refused_and_at_the_end_nothing_to_do(built: Built) -> None:
    with pytest.raises(RepairRefused, match=f"end at {COUNT}, before {COUNT + 1}"):
        repair(str(built.datadir), COUNT + 1)
    before = files_of(built.datadir)
    report = repair(str(built.datadir), COUNT)
    assert report.changes_nothing and report.backup_dir is None
    assert files_of(built.datadir) == before
    assert not any(p.name.startswith("repair-backup-") for p in built.datadir.iterdir())


def test_repair_cuts_a_torn_tail_and_a_segment_boundary(built: Built) -> None:
    """Cut exactly at a segment's end: later segments go, the torn tail is kept in the backup."""
    last = built.segment_paths()[-1]
    with open(last, "ab") as f:
        f.write(b"\x30\x00\x00")
    segments = built.segment_paths()
    keep = int(segments[3].name.split(".")[0]) - 1  # last record of segment 2 (0-based)
    report = repair(str(built.datadir), keep)
    assert report.truncated is None
    assert [m.path for m in report.removed_segments] == [str(p) for p in segments[3:]]
    assert journal_seqs(built.datadir) == list(range(1, keep + 1))
    assert report.backup_dir is not None
    assert Path(report.backup_dir, "journal", last.name).read_bytes().endswith(b"\x30\x00\x00")
    svc = start_bank(built.datadir)
    assert svc.model == built.models[keep]
    stop(svc)


def test_repair_to_zero_keeps_the_journal_identity(built: Built) -> None:
    journal = FileJournal(str(built.datadir / "journal"), readonly=True)
    journal.open()
    list(journal.replay())
    report = repair(str(built.datadir), 0)
    assert report.kept_records == 0 and len(report.moved_snapshots) == 2
    (only,) = built.segment_paths()
    assert only.stat().st_size == rec.SEGMENT_HEADER_SIZE
    svc = start_bank(built.datadir)
    assert svc.model == built.models[0] and svc.loaded_snapshot_seq == 0
    assert svc.engine._journal_id == journal.journal_id
    stop(svc)


class FailingRename(OSFileSystem):
    """Fails the ``n``-th rename with EIO: a repair interrupted part-way."""

    def __init__(self, n: int) -> None:
        self.n = n

    def rename(self, src: str, dst: str) -> None:
        self.n -= 1
        if self.n == 0:
            raise OSError(errno.EIO, "Input/output error")
        super().rename(src, dst)


def test_interrupted_repair_is_safe_and_finishes_when_run_again(broken: tuple[Built, Any]) -> None:
    built, target = broken
    keep = target.seq - 1
    with pytest.raises(OSError, match="Input/output"):
        repair(str(built.datadir), keep, fs=FailingRename(2))
    # Part-way: start-up still refuses rather than start from a wrong state.
    with pytest.raises(JournalCorrupt):
        start_bank(built.datadir)
    report = repair(str(built.datadir), keep)
    assert report.backup_dir is not None
    svc = start_bank(built.datadir)
    assert svc.model == built.models[keep]
    stop(svc)
    # The two runs' backups together hold every removed segment.
    backed_up = {
        p.name for b in built.datadir.iterdir() if b.name.startswith("repair-backup-")
        for p in b.rglob("*.log")
    }
    segments = sorted(backed_up | {p.name for p in built.segment_paths()})
    assert segments[segments.index(target.path.name) + 1 :] == sorted(backed_up)


def test_tool_subcommands_are_registered() -> None:
    for name in ("verify", "inspect", "repair"):
        assert name in cli.SUBCOMMANDS
    assert (tools_cli.EXIT_OK, tools_cli.EXIT_FAILED, tools_cli.EXIT_USAGE) == (
        cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE,
    )
    args = cli.build_parser().parse_args(["inspect", "d", "--from", "3", "--to", "9", "--command", "x"])
    assert (args.datadir, args.from_seq, args.to_seq, args.command, args.json) == ("d", 3, 9, "x", False)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["repair", "d"])
    assert e.value.code == cli.EXIT_USAGE


def test_verify_agrees_with_startup_on_a_damaged_last_record_under_a_snapshot(tmp_path: Path) -> None:
    """
    A snapshot covering the last record proves it was acknowledged: start-up
    refuses rather than cutting it off, and verify must say the same.
    """
    from conftest import sync_runner
    from twisted.internet.task import Clock

    from examples.bank import Deposit, bank
    from txjournal.errors import JournalCorrupt
    from txjournal.journal.file import segment_name
    from txjournal.service import JournalService

    datadir = str(tmp_path / "bank")
    svc = JournalService(bank, datadir, runner=sync_runner, reactor=Clock())
    svc.startService()
    for _ in range(3):
        svc.execute(Deposit("a", 1))
    svc.stopService()  # snapshot on stop: covers seq 3
    path = os.path.join(datadir, "journal", segment_name(1))
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[-3] ^= 0xFF
        f.seek(0)
        f.write(data)
    report = verify(datadir)
    assert not report.ok
    assert any("a snapshot covers sequence number 3" in p.message for p in report.problems)
    with pytest.raises(JournalCorrupt, match="a snapshot covers sequence number 3"):
        JournalService(bank, datadir, runner=sync_runner, reactor=Clock()).startService()


def test_verify_reports_what_startup_refuses_or_kept_aside(tmp_path: Path) -> None:
    from conftest import sync_runner
    from twisted.internet.task import Clock

    from examples.bank import Deposit, bank
    from txjournal.service import JournalService

    datadir = tmp_path / "bank"
    svc = JournalService(bank, str(datadir), runner=sync_runner, reactor=Clock(), snapshot_on_stop=False)
    svc.startService()
    svc.execute(Deposit("a", 1))
    svc.stopService()
    assert verify(str(datadir)).ok
    (datadir / "journal" / "00000000000000000001.log.damaged-tail-99").write_bytes(b"x")
    datadir.chmod(0o770)
    report = verify(str(datadir))
    messages = [(p.severity, p.message) for p in report.problems]
    assert any(sev == "error" and "start-up refuses this directory" in m for sev, m in messages)
    assert any(sev == "warning" and "may have been acknowledged" in m for sev, m in messages)


def test_verify_reports_a_record_of_an_unknown_kind(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    """Replay refuses a kind this version does not know, so verify says so (file journals too)."""
    import msgpack

    journal = FileJournal(str(built.datadir / "journal"), segment_size=built.segment_size, sync=False)
    journal.open()
    last = list(journal.replay())[-1]
    seq = journal.next_seq
    journal.append(
        rec.encode_record(journal.salt, seq, last.time_ns + 1, b"deposit", 1,
                          msgpack.packb({"account": "a", "amount": 1}), b"", 9),
        seq, seq,
    )
    journal.close()
    report = verify(str(built.datadir))
    assert [(p.seq, p.severity, p.command) for p in report.problems] == [(seq, "error", "deposit")]
    assert "kind 9, unknown to this version of txjournal" in report.problems[0].message
    code, out, _err = run_cli(capsys, "verify", str(built.datadir))
    assert code == 1 and f"(seq {seq}, command 'deposit'): a record of kind 9" in out
