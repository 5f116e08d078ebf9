"""
``python -m txjournal stats``: the same records written to a file journal,
an SQLite journal and a PostgreSQL journal (the real server, see
``pg_support``) give the same statistics, from the library and from the
command line; the PostgreSQL views of ``docs/stats.rst`` run as written and
count right; ``--chart`` writes a PNG.
"""

from __future__ import annotations

import collections
import datetime
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
from pg_support import PG_DSN, drop_tables, require_pg, sql, unique_prefix
from psycopg.conninfo import conninfo_to_dict

from txjournal import record as rec
from txjournal import stats as st
from txjournal import stats_cli
from txjournal.journal.file import FileJournal
from txjournal.journal.postgres import PostgresJournal
from txjournal.journal.sqlite import SQLiteJournal

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "stats.rst"

T0 = int(datetime.datetime(2026, 3, 1, 22, 15, tzinfo=datetime.UTC).timestamp()) * 10**9
MIN = 60 * 10**9


def _records() -> list[tuple[int, str, int, str | None, dict[str, Any]]]:
    """``(time_ns, name, kind, user, fields)``: two days, several hours, users and sizes."""
    out: list[tuple[int, str, int, str | None, dict[str, Any]]] = []
    plan = [
        # minutes after T0 (22:15 on March 1st), name, kind, user
        (0, "deposit", rec.KIND_COMMAND, "alice"),
        (1, "deposit", rec.KIND_COMMAND, "bob"),
        (2, "balance", rec.KIND_QUERY, "alice"),
        (44, "withdraw", rec.KIND_COMMAND, "alice"),  # 22:59
        (45, "transfer", rec.KIND_COMMAND, None),  # 23:00 exactly
        (80, "deposit", rec.KIND_COMMAND, "bob"),
        (105, "balance", rec.KIND_QUERY, "bob"),  # 00:00 on March 2nd
        (106, "transfer", rec.KIND_COMMAND, "alice"),
        (300, "deposit", rec.KIND_COMMAND, None),
        (301, "balance", rec.KIND_QUERY, None),
        (302, "withdraw", rec.KIND_COMMAND, "bob"),
    ]
    for i, (minutes, name, kind, user) in enumerate(plan):
        fields = {"account": "alice" if i % 2 else "bob", "amount": 10 ** (i % 5), "memo": "x" * i}
        # The 23:00 record is one nanosecond before, and the next exactly on, the hour.
        t = T0 + minutes * MIN - (1 if minutes == 44 else 0)
        out.append((t, name, kind, user, fields))
    return out


RECORDS = _records()


def _encoded(salt: bytes, first_seq: int, records: list[Any]) -> bytes:
    return b"".join(
        rec.encode_record(
            salt, first_seq + i, t, name.encode(), 1, msgpack.packb(fields),
            (user or "").encode(), kind,
        )
        for i, (t, name, kind, user, fields) in enumerate(records)
    )


def _fill(journal: Any) -> None:
    journal.open()
    assert list(journal.replay(1)) == []
    # Three batches, as a running service would write them.
    seq = 1
    for batch in (RECORDS[:3], RECORDS[3:7], RECORDS[7:]):
        journal.append(_encoded(journal.salt, seq, batch), seq, seq + len(batch) - 1)
        seq += len(batch)
    journal.close()


def _pg_url() -> str:
    if PG_DSN.startswith(("postgresql://", "postgres://")):
        return PG_DSN
    p = conninfo_to_dict(PG_DSN)
    auth = quote(str(p.get("user", "postgres")))
    if p.get("password"):
        auth += ":" + quote(str(p["password"]))
    return f"postgresql://{auth}@{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '')}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, list[str]]]]:
    """Backend name -> (SOURCE, extra CLI arguments), all holding RECORDS."""
    require_pg()
    base = tmp_path_factory.mktemp("stats")
    datadir = base / "data"
    datadir.mkdir(mode=0o700)
    _fill(FileJournal(str(datadir / "journal")))
    db = base / "db" / "journal.sqlite"
    _fill(SQLiteJournal(str(db)))
    prefix = unique_prefix()
    _fill(PostgresJournal(PG_DSN, table_prefix=prefix))
    try:
        yield {
            "file": (str(datadir), []),
            "sqlite": (f"sqlite://{db}", []),
            "postgres": (_pg_url(), ["--table-prefix", prefix]),
        }
    finally:
        drop_tables(prefix)


def _library(source: str, extra: list[str], **kwargs: Any) -> dict[str, Any]:
    prefix = extra[1] if extra else "txjournal"
    data = st.stats(source, table_prefix=prefix, **kwargs).to_dict()
    del data["source"]
    return data


def _cli(source: str, extra: list[str], *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "txjournal", "stats", source, *extra, "--json", *args],
        capture_output=True, text=True, cwd=str(ROOT), timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "password" not in out.stdout
    del data["source"]
    return data


def _size(t: int, name: str, kind: int, user: str | None, fields: dict[str, Any]) -> int:
    return len(rec.encode_record(b"\0" * 8, 1, t, name.encode(), 1, msgpack.packb(fields), (user or "").encode(), kind))


def _expected(by: str | None, since: int | None = None, until: int | None = None) -> dict[Any, dict[str, Any]]:
    """Computed here, independently of txjournal.stats: key -> counts."""
    groups: dict[Any, dict[str, Any]] = {}
    for r in RECORDS:
        t, name, kind, user = r[:4]
        if (since is not None and t < since) or (until is not None and t >= until):
            continue
        moment = datetime.datetime.fromtimestamp(t // 10**9, datetime.UTC)
        key = {
            "name": name,
            "user": user,
            "hour": moment.strftime("%Y-%m-%dT%H:00:00Z"),
            "day": moment.strftime("%Y-%m-%d"),
            None: "all",
        }[by]
        g = groups.setdefault(key, {"commands": 0, "queries": 0, "total_bytes": 0, "times": []})
        g["commands" if kind == rec.KIND_COMMAND else "queries"] += 1
        g["total_bytes"] += _size(*r)
        g["times"].append(t)
    return groups


def _check_against_expected(data: dict[str, Any], by: str | None, **window: int) -> None:
    expected = _expected(by, **window)
    assert [g["key"] for g in data["groups"]] == sorted(expected, key=lambda k: (k is not None, k or ""))
    for g in data["groups"]:
        e = expected[g["key"]]
        assert (g["commands"], g["queries"], g["other"]) == (e["commands"], e["queries"], 0)
        assert g["failed"] is None
        assert g["total_bytes"] == e["total_bytes"]
        assert g["mean_bytes"] == round(e["total_bytes"] / (e["commands"] + e["queries"]), 1)
        assert (g["first_time_ns"], g["last_time_ns"]) == (min(e["times"]), max(e["times"]))
    assert data["total"]["commands"] == sum(e["commands"] for e in expected.values())
    assert data["total"]["queries"] == sum(e["queries"] for e in expected.values())
    assert "outcome" in data["note"]


@pytest.mark.parametrize("by", [None, "name", "user", "hour", "day"])
def test_every_backend_gives_the_same_stats(sources: dict[str, tuple[str, list[str]]], by: str | None) -> None:
    results = {name: _library(source, extra, by=by) for name, (source, extra) in sources.items()}
    assert results["file"] == results["sqlite"] == results["postgres"]
    _check_against_expected(results["file"], by)


def test_hours_and_days_split_at_the_exact_boundary(sources: dict[str, tuple[str, list[str]]]) -> None:
    for source, extra in sources.values():
        hours = {g["key"]: g for g in _library(source, extra, by="hour")["groups"]}
        assert hours["2026-03-01T22:00:00Z"]["commands"] == 3  # incl. 22:59:59.999999999
        assert hours["2026-03-01T23:00:00Z"]["commands"] == 2
        days = {g["key"]: g["commands"] + g["queries"] for g in _library(source, extra, by="day")["groups"]}
        assert days == {"2026-03-01": 6, "2026-03-02": 5}


def test_since_and_until(sources: dict[str, tuple[str, list[str]]]) -> None:
    since = st.parse_time("2026-03-01T23:00:00Z")
    until = st.parse_time("2026-03-02T00:01")  # no zone: UTC
    results = [
        _library(source, extra, by="name", since=since, until=until) for source, extra in sources.values()
    ]
    assert results[0] == results[1] == results[2]
    _check_against_expected(results[0], "name", since=since, until=until)
    assert results[0]["total"]["commands"] + results[0]["total"]["queries"] == 3
    assert results[0]["since"] == "2026-03-01T23:00:00.000000Z"


@pytest.mark.slow
@pytest.mark.parametrize("by", [None, "user", "hour"])
def test_cli_json_matches_the_library(sources: dict[str, tuple[str, list[str]]], by: str | None) -> None:
    args = ["--by", by] if by else []
    args += ["--since", "2026-03-01T22:30:00+00:00"]
    since = st.parse_time("2026-03-01T22:30:00+00:00")
    library = _library(*sources["file"], by=by, since=since)
    for source, extra in sources.values():
        assert _cli(source, extra, *args) == library


def test_cli_table(sources: dict[str, tuple[str, list[str]]], capsys: pytest.CaptureFixture[str]) -> None:
    from txjournal.cli import main

    assert main(["stats", sources["sqlite"][0], "--by", "name"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^deposit\s+4\s+0\s+\?", out, re.M), out
    assert re.search(r"^TOTAL\s+8\s+3\s+\?", out, re.M), out
    assert "does not record outcomes" in out


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from txjournal.cli import main

    assert main(["stats", str(tmp_path / "nowhere")]) == 2
    assert "neither a data directory nor a journal URL" in capsys.readouterr().err
    assert main(["stats", f"sqlite://{tmp_path}/missing.db"]) == 1
    assert "no SQLite journal" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["stats", str(tmp_path), "--since", "yesterday"])
    assert e.value.code == 2


def test_missing_postgres_table_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from txjournal.cli import main

    require_pg()
    assert main(["stats", _pg_url(), "--table-prefix", unique_prefix()]) == 1
    assert "no journal table" in capsys.readouterr().err


def test_chart_without_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from txjournal.cli import main

    real = stats_cli.importlib.util.find_spec
    monkeypatch.setattr(
        stats_cli.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    assert main(["stats", str(tmp_path), "--chart", str(tmp_path / "c.png")]) == 2
    assert "--chart needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


@pytest.mark.slow
def test_chart_writes_a_png(sources: dict[str, tuple[str, list[str]]], tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  (the test extra installs it: this test must run)

    for name, (source, extra) in sources.items():
        png = tmp_path / f"{name}.png"
        out = subprocess.run(
            [sys.executable, "-m", "txjournal", "stats", source, *extra, "--by", "name", "--chart", str(png)],
            capture_output=True, text=True, cwd=str(ROOT), timeout=60, check=False,
        )
        assert out.returncode == 0, out.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 1000


# -- the documented PostgreSQL views -----------------------------------------------


def doc_views(prefix: str) -> list[str]:
    """The ``CREATE VIEW`` statements of docs/stats.rst, for tables ``<prefix>_*``."""
    text = DOCS.read_text(encoding="utf-8")
    block = text.split(".. code-block:: sql\n", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    statements = [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
    assert len(statements) == 4 and all(s.startswith("CREATE OR REPLACE VIEW txjournal_") for s in statements)
    return [s.replace("txjournal_", f"{prefix}_") for s in statements]


def _rows(query: str) -> list[tuple[Any, ...]]:
    return sql(query)


VIEWS = ("commands_per_hour", "commands_per_day", "per_user", "sizes")


def test_documented_views_run_and_count_right() -> None:
    require_pg()
    prefix = unique_prefix()
    _fill(PostgresJournal(PG_DSN, table_prefix=prefix))
    try:
        for statement in doc_views(prefix):
            sql(statement)

        hourly = collections.Counter[tuple[str, str]]()
        daily = collections.Counter[tuple[str, str]]()
        users: dict[str | None, list[int]] = {}
        sizes: dict[tuple[str, int], list[int]] = {}
        for r in RECORDS:
            t, name, kind, user = r[:4]
            moment = datetime.datetime.fromtimestamp(t // 10**9, datetime.UTC)
            if kind == rec.KIND_COMMAND:
                hourly[(moment.strftime("%Y-%m-%d %H:00"), name)] += 1
                daily[(moment.strftime("%Y-%m-%d"), name)] += 1
            u = users.setdefault(user, [0, 0])
            u[0 if kind == rec.KIND_COMMAND else 1] += 1
            sizes.setdefault((name, kind), []).append(_size(*r))

        rows = _rows(f"SELECT hour, name, commands FROM {prefix}_commands_per_hour")
        got = {(h.strftime("%Y-%m-%d %H:%M"), n): c for h, n, c in rows}
        assert got == dict(hourly)
        assert got[("2026-03-01 22:00", "withdraw")] == 1  # 22:59:59.999999999 stays in 22:00

        rows = _rows(f"SELECT day, name, commands FROM {prefix}_commands_per_day")
        assert {(d.isoformat(), n): c for d, n, c in rows} == dict(daily)

        rows = _rows(f'SELECT "user", commands, queries, first_time, last_time FROM {prefix}_per_user')
        assert {u: [c, q] for u, c, q, _, _ in rows} == users
        for u, _c, _q, first, last in rows:
            times = [r[0] for r in RECORDS if r[3] == u]
            assert abs(first.timestamp() - min(times) / 1e9) < 1e-3
            assert abs(last.timestamp() - max(times) / 1e9) < 1e-3

        rows = _rows(f"SELECT name, kind, records, total_bytes, mean_bytes, max_bytes FROM {prefix}_sizes")
        assert {(n, k): (c, int(tb), float(mb), mx) for n, k, c, tb, mb, mx in rows} == {
            key: (len(v), sum(v), round(sum(v) / len(v), 1), max(v)) for key, v in sizes.items()
        }
        # The views agree with `stats` on the same table.
        report = st.stats(_pg_url(), by="name", table_prefix=prefix)
        for g in report.groups:
            assert g.total_bytes == sum(sum(v) for (n, _), v in sizes.items() if n == g.key)
    finally:
        sql(f"DROP VIEW IF EXISTS {', '.join(f'{prefix}_{v}' for v in VIEWS)}")
        drop_tables(prefix)
