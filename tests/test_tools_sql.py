"""
The operator tools on SQL journals named by URL (``python -m txjournal
verify | inspect | check | replay sqlite:///... | postgresql://...``, with
``--snapshots``): journals written by the real service into SQLite and
into the real PostgreSQL server (see ``pg_support``; the tests fail, never
skip, without it), then damaged with SQL the way a bad restore or a hand
edit damages them.

What must hold besides the reports: the tools only read. No table is
created (not even in an empty database), the SQLite file is not changed,
and a PostgreSQL journal's writer epoch stays as it is, so a writer that
is running while the tools look keeps writing. Passwords in URLs never
appear in what they print.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
from bankjournal import START_TIME, build_bank, command_mix, sync_runner
from pg_support import PG_DSN, drop_tables, require_pg, sql, unique_prefix
from psycopg.conninfo import conninfo_to_dict
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from examples.bank import Bank, Deposit, bank
from txjournal import JournalService, cli, history, tools
from txjournal import record as rec
from txjournal.errors import JournalCorrupt
from txjournal.journal.postgres import PostgresJournal
from txjournal.journal.readonly import ReadOnlyPostgresJournal, ReadOnlySource
from txjournal.journal.sql import rows_of_batch
from txjournal.journal.sqlite import SQLiteJournal
from txjournal.snapshot.file import FileSnapshotStore
from txjournal.snapshot.postgres import PostgresSnapshotStore
from txjournal.snapshot.sqlite import SQLiteSnapshotStore

pytestmark = pytest.mark.timeout(120)

COUNT = 40
APP = "examples.bank:bank"
SNAPSHOTS_AFTER = (15, 30)


def _password() -> str:
    """The password the PostgreSQL URLs carry: the real one if any, else one trust auth ignores."""
    return str(conninfo_to_dict(PG_DSN).get("password") or "sekret-pw-4711")


def pg_url() -> str:
    """The test server as a ``postgresql://`` URL, with a password in it."""
    p = conninfo_to_dict(PG_DSN)
    auth = f"{quote(str(p.get('user', 'postgres')))}:{quote(_password())}"
    return f"postgresql://{auth}@{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '')}"


# -- journals written by the service --------------------------------------------------


@dataclass
class SQLBuilt:
    """An SQL journal (and snapshot store) written by the service, and the models along the way."""

    backend: str
    #: The journal's URL, as an operator types it (with a password for PostgreSQL).
    url: str
    #: The snapshot store's URL.
    snapshots: str
    #: Extra command-line arguments (the table prefix).
    extra: list[str]
    #: ``models[k]``: the live model after the first ``k`` commands.
    models: list[Bank]
    #: Runs SQL on the journal's database from another (writable) connection;
    #: ``{records}``, ``{meta}`` and ``{snapshots}`` name the tables.
    query: Callable[..., list[tuple[Any, ...]]]
    prefix: str = "txjournal"
    new_journal: Callable[[], Any] = field(default=lambda: None)
    new_store: Callable[[], Any] = field(default=lambda: None)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"table_prefix": self.prefix}

    def blob(self, seq: int) -> bytes:
        return bytes(self.query("SELECT record FROM {records} WHERE seq = %s", (seq,))[0][0])

    def set_blob(self, seq: int, blob: bytes) -> None:
        self.query("UPDATE {records} SET record = %s WHERE seq = %s", (blob, seq))

    def salt(self) -> bytes:
        (value,) = self.query("SELECT value FROM {meta} WHERE key = 'journal_id'")[0]
        return int(str(value)).to_bytes(8, "little")

    def insert(self, rows: list[Any]) -> None:
        cast = "%s::jsonb" if self.backend == "postgres" else "%s"
        for row in rows:
            self.query(f"INSERT INTO {{records}} VALUES (%s, %s, %s, %s, %s, %s, {cast}, %s)", row)


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def run_service(journal: Any, store: Any, commands: list[object], snapshot_after: tuple[int, ...] = ()) -> list[Bank]:
    """Execute ``commands`` one by one through a service on ``journal``; the models along the way."""
    clock = Clock()
    clock.advance(START_TIME)
    svc: JournalService[Bank] = JournalService(
        bank, journal=journal, snapshots=store, runner=sync_runner, reactor=clock,
        snapshot_on_stop=False, snapshot_interval=None,
    )
    svc.startService()
    models = [Bank()]
    for i, command in enumerate(commands, 1):
        clock.advance(1.5)
        d = svc.execute(command)
        assert d.called
        d.addErrback(lambda _f: None)  # a rejected command: part of history
        models.append(copy.deepcopy(svc.model))
        if i in snapshot_after:
            assert _result(svc.snapshot()) == i
    assert _result(svc.stopService()) is None
    return models


def _sqlite_query(path: Path) -> Callable[..., list[tuple[Any, ...]]]:
    def query(text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        text = text.format(records="records", meta="meta", snapshots="txjournal_snapshots")
        conn = sqlite3.connect(str(path), isolation_level=None)
        try:
            return conn.execute(text.replace("%s", "?"), params).fetchall()
        finally:
            conn.close()

    return query


def _pg_query(prefix: str) -> Callable[..., list[tuple[Any, ...]]]:
    def query(text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return sql(text.format(
            records=f"{prefix}_records", meta=f"{prefix}_meta", snapshots=f"{prefix}_snapshots"
        ), params)

    return query


def drop_all(prefix: str) -> None:
    drop_tables(prefix)
    sql(f"DROP TABLE IF EXISTS {prefix}_snapshots")


@pytest.fixture(params=["sqlite", "postgres"])
def built(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLBuilt]:
    """The bank's command mix in an SQL journal, snapshots after 15 and 30 in an SQL store."""
    commands = command_mix(COUNT)
    if request.param == "sqlite":
        db = tmp_path / "db" / "journal.sqlite"
        snaps = tmp_path / "db" / "snapshots.sqlite"
        models = run_service(SQLiteJournal(str(db)), SQLiteSnapshotStore(str(snaps)), commands, SNAPSHOTS_AFTER)
        query = _sqlite_query(db)
        yield SQLBuilt(
            "sqlite", f"sqlite://{db}", f"sqlite://{snaps}", [], models, query,
            new_journal=lambda: SQLiteJournal(str(db)),
        )
        return
    require_pg()
    prefix = unique_prefix()
    try:
        models = run_service(
            PostgresJournal(PG_DSN, table_prefix=prefix), PostgresSnapshotStore(PG_DSN, table_prefix=prefix),
            commands, SNAPSHOTS_AFTER,
        )
        yield SQLBuilt(
            "postgres", pg_url(), pg_url(), ["--table-prefix", prefix], models, _pg_query(prefix), prefix,
            new_journal=lambda: PostgresJournal(PG_DSN, table_prefix=prefix),
            new_store=lambda: PostgresSnapshotStore(PG_DSN, table_prefix=prefix),
        )
    finally:
        drop_all(prefix)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``python -m txjournal *argv`` in process; argparse's usage exits count as their status."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        assert isinstance(e.code, int)
        code = e.code
    out, err = capsys.readouterr()
    assert _password() not in out + err
    return code, out, err


def flipped(blob: bytes, index: int = -1) -> bytes:
    data = bytearray(blob)
    data[index] ^= 0x10
    return bytes(data)


def writer_state(b: SQLBuilt) -> tuple[Any, ...]:
    """What a tool must leave as it is: the meta table (writer epoch included) and every row."""
    meta = sorted(b.query("SELECT key, value FROM {meta}"))
    rows = b.query("SELECT seq, record FROM {records} ORDER BY seq")
    return tuple(meta), tuple((s, bytes(r)) for s, r in rows)


# -- verify ---------------------------------------------------------------------------


def test_verify_a_good_journal(built: SQLBuilt, capsys: pytest.CaptureFixture[str]) -> None:
    report = tools.verify(built.url, snapshots=built.snapshots, **built.kwargs)
    assert report.ok, report.problems
    assert report.backend == ("sqlite" if built.backend == "sqlite" else "postgresql")
    assert (report.rows, report.records, report.first_seq, report.last_seq) == (COUNT, COUNT, 1, COUNT)
    assert report.journal_complete and report.journal_id is not None
    assert [(s.seq, s.ok) for s in report.snapshots] == [(15, True), (30, True)]
    assert all(s.size and s.size > 0 for s in report.snapshots)
    assert report.startup is None and report.notes == []
    assert _password() not in json.dumps(report.to_dict())

    code, out, err = run_cli(capsys, "verify", built.url, "--snapshots", built.snapshots, *built.extra)
    assert code == 0, out + err
    assert f"Journal: {COUNT} rows, seq 1..{COUNT}\n" in out
    assert f"journal id {report.journal_id:016x}" in out
    assert "Snapshots in " in out and "OK: no problems found." in out
    if built.backend == "postgres":
        assert "postgresql://postgres:***@" in out

    code, out, _ = run_cli(capsys, "verify", built.url, "--json", *built.extra)
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["rows"] == COUNT and data["snapshot_store"] is None
    # Without --snapshots nothing is said about snapshots but that they were not checked.
    assert data["snapshots"] == [] and "snapshots not checked" in data["notes"][0]


def test_verify_names_a_damaged_row_and_reads_on(built: SQLBuilt, capsys: pytest.CaptureFixture[str]) -> None:
    built.set_blob(20, flipped(built.blob(20)))
    built.set_blob(35, flipped(built.blob(35), rec.PREFIX_SIZE + 3))

    report = tools.verify(built.url, **built.kwargs)
    assert [(p.seq, p.severity) for p in report.problems] == [(20, "error"), (35, "error")]
    p = report.problems[0]
    assert "the stored record of row 20 is invalid (checksum mismatch)" in p.message
    name = built.query("SELECT name FROM {records} WHERE seq = 20")[0][0]
    assert p.command == name and "(unverified)" in p.message
    assert p.path.endswith(f"table {built.prefix + '_records' if built.backend == 'postgres' else 'records'}")
    # A bad row does not hide the rows after it.
    assert (report.rows, report.records, report.last_seq) == (COUNT, COUNT - 2, COUNT)
    assert report.startup is None  # no snapshots given: nothing covers the damage

    code, out, _ = run_cli(capsys, "verify", built.url, *built.extra)
    assert code == 1
    assert f"Journal: {COUNT} rows, seq 1..{COUNT}, 2 of them do not verify" in out
    assert "(seq 20, command " in out and "(seq 35, command " in out
    assert "restore the rows from a backup or a replica" in out

    # Snapshot 30 covers row 20 (start-up replays from 31) but not row 35.
    report = tools.verify(built.url, snapshots=built.snapshots, **built.kwargs)
    assert report.startup is not None and (report.startup.snapshot, report.startup.ok) == (30, False)
    built.set_blob(35, flipped(built.blob(35), rec.PREFIX_SIZE + 3))  # repaired
    report = tools.verify(built.url, snapshots=built.snapshots, **built.kwargs)
    assert [p.seq for p in report.errors] == [20]
    assert report.startup is not None and (report.startup.snapshot, report.startup.ok) == (30, True)
    assert "start-up is not affected (it loads snapshot 30 and replays 31..40" in report.errors[0].message


def test_verify_reports_a_gap_and_a_row_holding_another_seq(
    built: SQLBuilt, capsys: pytest.CaptureFixture[str]
) -> None:
    built.query("DELETE FROM {records} WHERE seq IN (20, 21)")
    built.set_blob(25, built.blob(26))  # a valid record, of the wrong sequence number
    report = tools.verify(built.url, **built.kwargs)
    assert [(p.seq, p.severity) for p in report.problems] == [(20, "error"), (25, "error")]
    assert "records 20..21 are missing (the next row is 22)" in report.problems[0].message
    assert "row 25 holds the record of sequence number 26" in report.problems[1].message
    assert (report.rows, report.records) == (COUNT - 2, COUNT - 3)

    code, out, _ = run_cli(capsys, "verify", built.url, *built.extra)
    assert code == 1
    assert "(seq 20): records 20..21 are missing" in out


def test_verify_reports_unknown_kinds_bad_fields_and_column_edits(
    built: SQLBuilt, capsys: pytest.CaptureFixture[str]
) -> None:
    salt = built.salt()
    t = int((START_TIME + 100) * 1e9)
    data = (
        rec.encode_record(salt, COUNT + 1, t, b"deposit", 1, msgpack.packb({"account": "a", "amount": 1}), b"", 7)
        + rec.encode_record(salt, COUNT + 2, t, b"deposit", 1, b"\xc1")
        + rec.encode_record(salt, COUNT + 3, t - 10**9, b"deposit", 1, msgpack.packb([1, 2]))
    )
    built.insert(rows_of_batch(data, COUNT + 1, COUNT + 3, salt))
    built.query("UPDATE {records} SET name = 'renamed' WHERE seq = 3")

    report = tools.verify(built.url, **built.kwargs)
    found = {(p.seq, p.severity): p.message for p in report.problems}
    assert set(found) == {(3, "warning"), (COUNT + 1, "error"), (COUNT + 2, "error"), (COUNT + 3, "warning"), (COUNT + 3, "error")}
    assert "columns disagree with its stored record (name column 'renamed', record" in found[(3, "warning")]
    assert "kind 7, unknown to this version of txjournal" in found[(COUNT + 1, "error")]
    assert "fields do not decode as MessagePack" in found[(COUNT + 2, "error")]
    assert "not a map" in found[(COUNT + 3, "error")]
    assert "logged time goes backwards" in found[(COUNT + 3, "warning")]

    code, out, _ = run_cli(capsys, "verify", built.url, *built.extra)
    assert code == 1 and "Problems: 5 (3 error(s), 2 warning(s))" in out


def test_verify_checks_the_snapshots_it_is_given(built: SQLBuilt, capsys: pytest.CaptureFixture[str]) -> None:
    if built.backend == "sqlite":
        snaps = Path(built.snapshots[len("sqlite://"):])
        query = _sqlite_query(snaps)
    else:
        query = built.query
    (payload,) = query("SELECT payload FROM {snapshots} WHERE seq = 30")[0]
    query("UPDATE {snapshots} SET payload = %s WHERE seq = 30", (flipped(bytes(payload)),))
    built.query("DELETE FROM {records} WHERE seq > 25")  # snapshot 30 now covers more than the journal

    report = tools.verify(built.url, snapshots=built.snapshots, **built.kwargs)
    assert [(s.seq, s.ok) for s in report.snapshots] == [(15, True), (30, False)]
    messages = [(p.seq, p.severity, p.message) for p in report.problems]
    assert (30, "error", messages[0][2]) == messages[0] and "fails its SHA-256 digest check" in messages[0][2]
    assert "snapshot covers sequence number 30 but the journal ends at 25" in messages[1][2]
    assert report.problems[0].path.endswith("_snapshots seq 30")

    # A pruned journal needs a valid snapshot that covers what was pruned.
    built.query("DELETE FROM {records} WHERE seq < 20")
    report = tools.verify(built.url, snapshots=built.snapshots, **built.kwargs)
    assert any("starts at sequence number 20 (older rows were pruned) but no valid snapshot" in p.message
               for p in report.errors)
    report = tools.verify(built.url, **built.kwargs)
    assert report.ok  # without a store that cannot be checked, and says so
    assert "older rows were pruned" in report.notes[1]

    code, out, _ = run_cli(capsys, "verify", built.url, "--snapshots", built.snapshots, *built.extra)
    assert code == 1 and "BAD" in out


def test_verify_a_data_directory_with_an_sql_snapshot_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datadir = tmp_path / "data"
    snaps = tmp_path / "snapshots.sqlite"
    clock = Clock()
    svc: JournalService[Bank] = JournalService(
        bank, str(datadir), snapshots=SQLiteSnapshotStore(str(snaps)), runner=sync_runner,
        reactor=clock, snapshot_on_stop=False, snapshot_interval=None,
    )
    svc.startService()
    for i in range(5):
        _result(svc.execute(Deposit("alice", i + 1)))
    assert _result(svc.snapshot()) == 5
    _result(svc.stopService())

    report = tools.verify(str(datadir), snapshots=f"sqlite://{snaps}")
    assert report.ok and [(s.seq, s.ok) for s in report.snapshots] == [(5, True)]
    assert report.snapshot_store == f"{snaps} table txjournal_snapshots"
    # The data directory's own snapshots/ is empty: that is what verify looks at by default.
    assert tools.verify(str(datadir)).snapshots == []
    point = history.replay_to(bank, str(datadir), snapshots=f"sqlite://{snaps}")
    assert (point.snapshot, point.seq) == (5, 5)
    code, out, _ = run_cli(capsys, "verify", str(datadir), "--snapshots", f"sqlite://{snaps}")
    assert code == 0 and f"Snapshots in {snaps} table txjournal_snapshots: 1" in out


# -- inspect --------------------------------------------------------------------------


def test_inspect_shows_what_it_shows_for_files(
    built: SQLBuilt, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same commands at the same times through a data directory.
    files = build_bank(tmp_path / "files", command_mix(COUNT), snapshot_after=SNAPSHOTS_AFTER)
    expected = list(tools.inspect(str(files.datadir)))
    assert len(expected) == COUNT
    assert list(tools.inspect(built.url, **built.kwargs)) == expected
    assert list(tools.inspect(built.url, 5, 9, "deposit", "command", **built.kwargs)) == list(
        tools.inspect(str(files.datadir), 5, 9, "deposit", "command")
    )
    assert list(tools.inspect(built.url, 41, None, **built.kwargs)) == []

    code, out, _ = run_cli(capsys, "inspect", built.url, "--from", "3", "--to", "12", "--json", *built.extra)
    code2, out2, _ = run_cli(capsys, "inspect", str(files.datadir), "--from", "3", "--to", "12", "--json")
    assert code == code2 == 0 and out == out2 and len(out.splitlines()) == 10
    code, out, _ = run_cli(capsys, "inspect", built.url, "--to", "3", *built.extra)
    code2, out2, _ = run_cli(capsys, "inspect", str(files.datadir), "--to", "3")
    assert code == code2 == 0 and out == out2


def test_inspect_stops_at_damage_after_the_records_before_it(
    built: SQLBuilt, capsys: pytest.CaptureFixture[str]
) -> None:
    built.set_blob(20, flipped(built.blob(20)))
    records = tools.inspect(built.url, **built.kwargs)
    seen = []
    with pytest.raises(JournalCorrupt) as info:
        for r in records:
            seen.append(r["seq"])
    assert seen == list(range(1, 20)) and info.value.seq == 20
    assert [r["seq"] for r in tools.inspect(built.url, 21, 22, **built.kwargs)] == [21, 22]

    code, out, err = run_cli(capsys, "inspect", built.url, *built.extra)
    assert code == 1
    assert len(out.splitlines()) == 1 + 19  # the header and the records before the damage
    assert "row 20 is invalid (checksum mismatch)" in err


# -- check and replay -----------------------------------------------------------------


def test_check_and_replay_from_an_sql_journal(built: SQLBuilt, capsys: pytest.CaptureFixture[str]) -> None:
    report = history.check(bank, built.url, snapshots=built.snapshots, **built.kwargs)
    assert report.ok and [(s.seq, s.matches) for s in report.snapshots] == [(15, True), (30, True)]
    assert report.last_seq == COUNT and report.stats.commands == COUNT
    assert report.snapshots[0].path.endswith("_snapshots seq 15")
    report = history.check(bank, built.url, **built.kwargs)
    assert report.ok and report.snapshots == [] and report.snapshot_store is None

    # A code change that alters history after record 20 diverges at snapshot 30.
    code, out, _ = run_cli(
        capsys, "check", built.url, "--app", "history_apps:bent", "--snapshots", built.snapshots, *built.extra
    )
    assert code == 1 and "snapshot           15  matches" in out and "DIVERGED at snapshot 30" in out
    code, out, _ = run_cli(capsys, "check", built.url, "--app", APP, *built.extra)
    assert code == 0 and "No snapshot store given (--snapshots)" in out

    for until in (0, 7, 15, 22, COUNT):
        point = history.replay_to(bank, built.url, until_seq=until, snapshots=built.snapshots, **built.kwargs)
        assert point.model == built.models[until] and point.seq == until
        assert point.snapshot == max((s for s in SNAPSHOTS_AFTER if s <= until), default=0)
    point = history.replay_to(bank, built.url, **built.kwargs)
    assert point.snapshot == 0 and point.model == built.models[COUNT] and point.journal_end
    point = history.replay_to(bank, built.url, use_snapshots=False, snapshots=built.snapshots, **built.kwargs)
    assert point.snapshot == 0 and point.stats.commands == COUNT

    code, out, err = run_cli(
        capsys, "replay", built.url, "--app", APP, "--until", "22", "--snapshots", built.snapshots,
        "--query", "total", *built.extra,
    )
    assert code == 0, err
    assert json.loads(out) == sum(built.models[22].accounts.values())
    assert "snapshot 15 + 7 commands" in err


def test_replay_stops_at_a_damaged_row(built: SQLBuilt, capsys: pytest.CaptureFixture[str]) -> None:
    built.query("DELETE FROM {records} WHERE seq = 20")
    with pytest.raises(JournalCorrupt, match="records 20..20 are missing"):
        history.replay_to(bank, built.url, **built.kwargs)
    # From snapshot 30 on, the gap is not read (as at start-up).
    point = history.replay_to(bank, built.url, snapshots=built.snapshots, **built.kwargs)
    assert point.snapshot == 30 and point.model == built.models[COUNT]
    code, _, err = run_cli(capsys, "check", built.url, "--app", APP, *built.extra)
    assert code == 1 and "records 20..20 are missing" in err


# -- the tools only read ----------------------------------------------------------------


def _every_tool(built: SQLBuilt, capsys: pytest.CaptureFixture[str]) -> None:
    assert tools.verify(built.url, snapshots=built.snapshots, **built.kwargs).ok
    assert len(list(tools.inspect(built.url, **built.kwargs))) == COUNT
    assert history.check(bank, built.url, snapshots=built.snapshots, **built.kwargs).ok
    assert history.replay_to(bank, built.url, snapshots=built.snapshots, **built.kwargs).seq == COUNT
    s = ["--snapshots", built.snapshots, *built.extra]
    assert run_cli(capsys, "verify", built.url, *s)[0] == 0
    assert run_cli(capsys, "inspect", built.url, *built.extra)[0] == 0
    assert run_cli(capsys, "check", built.url, "--app", APP, *s)[0] == 0
    assert run_cli(capsys, "replay", built.url, "--app", APP, *s)[0] == 0


def test_the_tools_change_nothing(built: SQLBuilt, capsys: pytest.CaptureFixture[str]) -> None:
    before = writer_state(built)
    if built.backend == "sqlite":
        db = Path(built.url[len("sqlite://"):])
        files = {p: p.read_bytes() for p in (db, Path(built.snapshots[len("sqlite://"):]))}
    else:
        assert "writer_epoch" in dict(before[0])
    _every_tool(built, capsys)
    assert writer_state(built) == before
    if built.backend == "sqlite":
        assert {p: p.read_bytes() for p in files} == files


def test_a_running_postgres_writer_is_not_fenced(capsys: pytest.CaptureFixture[str]) -> None:
    """The tools look at a journal whose writer is running: it goes on writing afterwards."""
    require_pg()
    prefix = unique_prefix()
    try:
        clock = Clock()
        clock.advance(START_TIME)
        svc: JournalService[Bank] = JournalService(
            bank, journal=PostgresJournal(PG_DSN, table_prefix=prefix),
            snapshots=PostgresSnapshotStore(PG_DSN, table_prefix=prefix), runner=sync_runner,
            reactor=clock, snapshot_on_stop=False, snapshot_interval=None,
        )
        svc.startService()
        try:
            for i in range(COUNT):
                clock.advance(1.5)
                _result(svc.execute(Deposit("alice", i + 1)))
            assert _result(svc.snapshot()) == COUNT
            built = SQLBuilt("postgres", pg_url(), pg_url(), ["--table-prefix", prefix], [], _pg_query(prefix), prefix)
            epoch = built.query("SELECT value FROM {meta} WHERE key = 'writer_epoch'")
            _every_tool(built, capsys)
            assert built.query("SELECT value FROM {meta} WHERE key = 'writer_epoch'") == epoch
            # Still the writer: the next command is written and acknowledged.
            assert _result(svc.execute(Deposit("alice", 1))) == sum(range(1, COUNT + 1)) + 1
            assert built.query("SELECT max(seq) FROM {records}") == [(COUNT + 1,)]
        finally:
            _result(svc.stopService())
    finally:
        drop_all(prefix)


def test_read_only_journals_refuse_to_write(built: SQLBuilt) -> None:
    journal = tools.open_sql_journal(built.url, built.prefix)
    try:
        with pytest.raises(ReadOnlySource):
            journal.append(b"", COUNT + 1, COUNT + 1)
        with pytest.raises(ReadOnlySource):
            journal.prune(10)
        if isinstance(journal, ReadOnlyPostgresJournal):
            # Even a statement that would write fails: the session is read-only.
            with pytest.raises(Exception, match="read-only transaction"):
                journal._execute(f"DELETE FROM {journal.records_table}")
        else:
            with pytest.raises(Exception, match="readonly database"):
                journal._execute("DELETE FROM records")
    finally:
        journal.close()
    assert built.query("SELECT count(*) FROM {records}") == [(COUNT,)]


# -- sources that are not there -----------------------------------------------------------


def _pg_tables(prefix: str) -> list[tuple[Any, ...]]:
    return sql("SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (prefix + "%",))


def test_an_empty_postgres_database_gets_no_tables(capsys: pytest.CaptureFixture[str]) -> None:
    require_pg()
    prefix = unique_prefix()
    url, extra = pg_url(), ["--table-prefix", prefix]
    try:
        for argv in (
            ["verify", url], ["inspect", url], ["check", url, "--app", APP],
            ["replay", url, "--app", APP], ["verify", url, "--snapshots", url],
        ):
            code, _, err = run_cli(capsys, *argv, *extra)
            assert code == 2, (argv, err)
            assert "no journal in postgresql://" in err and ":***@" in err
            assert f"table(s) {prefix}_records, {prefix}_meta do not exist" in err
        assert _pg_tables(prefix) == []
        # A journal, but no snapshot table where --snapshots points.
        journal = PostgresJournal(PG_DSN, table_prefix=prefix)
        journal.open()
        journal.close()
        tables = _pg_tables(prefix)
        code, _, err = run_cli(capsys, "verify", url, "--snapshots", url, *extra)
        assert code == 2 and "no snapshot store in" in err and f"{prefix}_snapshots do not exist" in err
        code, _, err = run_cli(capsys, "check", url, "--app", APP, "--snapshots", url, *extra)
        assert code == 2 and f"{prefix}_snapshots do not exist" in err
        assert _pg_tables(prefix) == tables
        # An empty journal verifies (nothing wrong in it).
        code, out, _ = run_cli(capsys, "verify", url, *extra)
        assert code == 0 and "Journal: 0 rows\n" in out
    finally:
        drop_all(prefix)


def test_an_empty_or_missing_sqlite_file_gets_nothing_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "j.sqlite"
    code, _, err = run_cli(capsys, "verify", f"sqlite://{missing}")
    assert code == 2 and f"no SQLite database at {missing}" in err
    assert not missing.parent.exists()
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    for argv in (["verify"], ["inspect"], ["check", "--app", APP], ["replay", "--app", APP]):
        code, _, err = run_cli(capsys, argv[0], f"sqlite://{empty}", *argv[1:])
        assert code == 2 and f"no journal in the SQLite database {empty}: table(s) records, meta do not exist" in err
    assert empty.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    code, _, err = run_cli(capsys, "verify", f"sqlite://{junk}")
    assert code == 1 and "file is not a database" in err


def test_bad_urls_are_clear_usage_errors_without_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = _password()
    cases = [
        (["verify", f"mysql://u:{pw}@h/db"], 2, "unknown journal URL 'mysql://u:***@h/db'"),
        (["inspect", "sqlite://host/x.db"], 2, "names a host"),
        (["verify", "file:"], 2, "give the data directory itself"),
        (["verify", f"postgresql://u:{pw}@[::1/db"], 2, "is not a valid PostgreSQL URL"),
        (["check", f"postgresql://u:{pw}@[::1/db", "--app", APP], 2, "is not a valid PostgreSQL URL"),
        (["verify", f"postgresql://postgres:{pw}@127.0.0.1:1/test"], 1, "cannot connect to postgresql://postgres:***@127.0.0.1:1/test"),
        (["replay", f"postgresql://postgres@127.0.0.1:1/test?password={pw}", "--app", APP], 1, "password=***"),
        (["verify", str(tmp_path), "--snapshots", f"mysql://u:{pw}@h/db"], 2, "--snapshots: unknown snapshot store URL"),
        (["verify", f"sqlite://{tmp_path}/x.db", "--table-prefix", "Bad-Prefix"], 2, "no SQLite database"),
        (["verify", pg_url(), "--table-prefix", "Bad-Prefix"], 2, "table prefix 'Bad-Prefix'"),
        (["verify", str(tmp_path), "--snapshots", str(tmp_path / "none")], 2, "neither a directory of snapshot files nor"),
    ]
    for argv, status, expected in cases:
        code, out, err = run_cli(capsys, *argv)
        assert (code, expected in err) == (status, True), (argv, err)
        assert "Traceback" not in err and out == ""


def test_repair_and_rebuild_refuse_urls(built: SQLBuilt, capsys: pytest.CaptureFixture[str]) -> None:
    before = writer_state(built)
    code, _, err = run_cli(capsys, "repair", built.url, "--truncate-after", "10", "--yes")
    assert code == 2 and "a database, which keeps every committed row whole" in err
    assert "python -m txjournal verify" in err
    code, _, err = run_cli(capsys, "rebuild", built.url, "--app", APP)
    assert code == 2 and "rebuild works on a data directory" in err
    with pytest.raises(tools.NeedsDataDir):
        tools.repair(built.url, 10)
    with pytest.raises(tools.NeedsDataDir):
        history.rebuild(bank, built.url)
    assert writer_state(built) == before


def test_sql_journal_with_a_directory_of_snapshot_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "j.sqlite"
    snapdir = tmp_path / "data" / "snapshots"
    snapdir.parent.mkdir(mode=0o700)
    models = run_service(SQLiteJournal(str(db)), FileSnapshotStore(str(snapdir)), command_mix(20), (12,))
    for given in (snapdir, snapdir.parent):  # the snapshots, or the data directory holding them
        report = tools.verify(f"sqlite://{db}", snapshots=str(given))
        assert report.ok and [(s.seq, s.ok) for s in report.snapshots] == [(12, True)]
        assert report.snapshot_store == str(snapdir)
    point = history.replay_to(bank, f"sqlite://{db}", until_seq=15, snapshots=str(snapdir))
    assert (point.snapshot, point.model) == (12, models[15])
    code, _, err = run_cli(capsys, "verify", f"sqlite://{db}", "--snapshots", "file:")
    assert code == 2 and "an SQL journal has no data directory" in err
