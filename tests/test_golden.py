"""
The golden data directory: files written by an earlier version of
txjournal (``tests/golden/v1``, made by ``tests/golden/make_golden.py`` and
committed) must keep loading into exactly the same model, listing exactly
the same records and verifying clean. A failure here means a change would
break existing users' data directories: bump the format version and keep
reading this one instead of regenerating the files.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bankjournal import start_bank, stop

from examples.bank import Bank, bank
from txjournal import history, tools
from txjournal.snapshot import file as snapfile

pytestmark = pytest.mark.timeout(60)

GOLDEN = Path(__file__).resolve().parent / "golden"
V1 = GOLDEN / "v1"

T0 = 1_750_000_000_000_000_000  # ns; the golden commands are 2.5 s apart

#: The model after all eleven records: what every way of loading must give.
EXPECTED = Bank(
    accounts={"alice": 50, "bob": 60, "carol": 15},
    opened_at={"alice": 1_750_000_000.0, "bob": 1_750_000_005.0, "carol": 1_750_000_015.0},
)
#: The model at the snapshot (record 6).
AT_SNAPSHOT = Bank(
    accounts={"alice": 50, "bob": 70},
    opened_at={"alice": 1_750_000_000.0, "bob": 1_750_000_005.0},
)

#: (seq, kind, name, version, user, fields) of every record, in order.
RECORDS: list[tuple[int, str, str, int, str | None, dict[str, Any]]] = [
    (1, "command", "open", 1, "admin", {"account": "alice"}),
    (2, "command", "deposit", 1, "admin", {"account": "alice", "amount": 100}),
    (3, "command", "deposit", 1, None, {"account": "bob", "amount": 50}),
    (4, "command", "withdraw", 1, None, {"account": "alice", "amount": 30}),
    (5, "command", "transfer", 1, "teller", {"source": "alice", "target": "bob", "amount": 20}),
    (6, "command", "withdraw", 1, "teller", {"account": "bob", "amount": 500}),
    (7, "command", "open", 1, None, {"account": "carol"}),
    (8, "command", "open", 1, "admin", {"account": "alice"}),
    (9, "command", "transfer", 1, None, {"source": "bob", "target": "carol", "amount": 10}),
    (10, "query", "balance", 1, "auditor", {"account": "bob"}),
    (11, "command", "deposit", 1, "teller", {"account": "carol", "amount": 5}),
]


def private_copy(source: Path, dest: Path) -> Path:
    """
    Copy ``source`` to ``dest`` with dirs 0700 and files 0600: a checkout
    gives the committed files whatever mode git and the umask make, and
    the service refuses a data directory others can write to.
    """
    shutil.copytree(source, dest)
    for root, dirs, files in os.walk(dest):
        os.chmod(root, 0o700)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)
    return dest


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    return private_copy(V1, tmp_path / "bank")


def test_golden_files_are_what_the_test_expects() -> None:
    names = sorted(str(p.relative_to(V1)) for p in V1.rglob("*") if p.is_file())
    assert names == [
        "journal/00000000000000000001.log",
        "journal/00000000000000000007.log",
        "snapshots/00000000000000000006.snapshot",
    ]
    data = (V1 / "snapshots" / "00000000000000000006.snapshot").read_bytes()
    assert snapfile.decode_header("golden", data, 6).version == 2


def test_copy_is_private(golden: Path) -> None:
    for path in [golden, *golden.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_service_loads_the_snapshot_and_replays_the_rest(golden: Path) -> None:
    svc = start_bank(golden)
    try:
        assert svc.loaded_snapshot_seq == 6 and svc.replayed == 5
        assert svc.model == EXPECTED
        assert svc.engine.applied_seq == 11
    finally:
        stop(svc)


def test_replay_from_scratch_and_from_the_snapshot(golden: Path) -> None:
    point = history.replay_to(bank, str(golden), use_snapshots=False)
    assert point.model == EXPECTED and point.seq == 11
    stats = point.stats
    assert (stats.records, stats.commands, stats.failed, stats.other, stats.retired) == (11, 10, 2, 1, 0)
    assert point.time_ns == T0 + 10 * 2_500_000_000
    assert history.replay_to(bank, str(golden)).model == EXPECTED
    assert history.replay_to(bank, str(golden), until_seq=6, use_snapshots=False).model == AT_SNAPSHOT
    at_snapshot = history.replay_to(bank, str(golden), until_seq=6)
    assert at_snapshot.snapshot == 6 and at_snapshot.model == AT_SNAPSHOT


def test_check_matches_the_golden_snapshot(golden: Path) -> None:
    report = history.check(bank, str(golden))
    assert report.ok and [(s.seq, s.matches) for s in report.snapshots] == [(6, True)]


def test_inspect_lists_exactly_the_golden_records(golden: Path) -> None:
    records = list(tools.inspect(str(golden)))
    assert [
        (r["seq"], r["kind"], r["command"], r["version"], r["user"], r["fields"]) for r in records
    ] == RECORDS
    assert [r["time_ns"] for r in records] == [T0 + i * 2_500_000_000 for i in range(11)]
    assert records[0]["time"] == "2025-06-15T15:06:40.000000Z"


def test_verify_finds_no_problem(golden: Path) -> None:
    report = tools.verify(str(golden))
    assert report.ok and report.problems == []
    assert (report.records, report.first_seq, report.last_seq) == (11, 1, 11)
    assert [(s.first_seq, s.last_seq) for s in report.segments] == [(1, 6), (7, 11)]
    assert [(s.seq, s.ok) for s in report.snapshots] == [(6, True)]
    assert report.journal_id == 0x601DE400C0FFEE01


def _make_golden() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_still_writes_the_same_journal(tmp_path: Path) -> None:
    """
    The script documents how the files were made; the journal it writes
    today is byte for byte the committed one (the snapshot is a pickle,
    whose bytes may change between Python versions, so it is compared as
    a model).
    """
    model = _make_golden().make(tmp_path / "fresh")
    assert model == EXPECTED
    for segment in ("00000000000000000001.log", "00000000000000000007.log"):
        assert (tmp_path / "fresh" / "journal" / segment).read_bytes() == (
            V1 / "journal" / segment
        ).read_bytes(), segment
    assert not (tmp_path / "fresh" / "LOCK").exists()
