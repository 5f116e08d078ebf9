"""
Durable commands/s with the SQL journals beside the file journal, and
pgbench's own single-row insert rate on the same PostgreSQL server.

Usage (from the repository root; PostgreSQL on 127.0.0.1:5432, trust auth,
database ``test``, or ``TXJOURNAL_TEST_PG`` set to a libpq DSN)::

    .venv/bin/python bench/bench_sql.py [--seconds 3]

Every row is printed with its ratio to the file journal at the same number
of callers, and pgbench's rate with its ratio to the PostgreSQL journal.
Results go to ``bench/results/sql-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402

from examples.bank import Deposit, bank  # noqa: E402
from txjournal.journal.postgres import PostgresJournal  # noqa: E402
from txjournal.journal.sqlite import SQLiteJournal  # noqa: E402
from txjournal.service import JournalService  # noqa: E402
from txjournal.snapshot.file import FileSnapshotStore  # noqa: E402

DSN = os.environ.get("TXJOURNAL_TEST_PG", "host=127.0.0.1 port=5432 dbname=test user=postgres")
CALLERS = (1, 100)


async def measure(reactor: Any, svc: JournalService[Any], callers: int, seconds: float) -> dict[str, float]:
    svc.startService()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await svc.execute(Deposit(f"acct{i % 50}", 1))
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(caller(i)) for i in range(callers)])
    elapsed = time.perf_counter() - started
    await svc.stopService()
    latencies.sort()
    return {
        "rate": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1e3 if latencies else 0.0,
        "count": len(latencies),
    }


def pgbench(clients: int, seconds: float) -> float:
    """pgbench's transactions/s for one-row inserts into a scratch table."""
    table = f"txj_pgbench_{uuid.uuid4().hex[:8]}"
    psql = ["psql", DSN, "-q", "-v", "ON_ERROR_STOP=1", "-c"]
    subprocess.run([*psql, f"CREATE TABLE {table} (id bigserial PRIMARY KEY, v int)"], check=True)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
            script.write(f"INSERT INTO {table} (v) VALUES (1);\n")
        out = subprocess.run(
            ["pgbench", "-n", "-f", script.name, "-c", str(clients), "-j", str(min(clients, 2)),
             "-T", str(max(1, int(seconds))), DSN],
            check=True, capture_output=True, text=True,
        ).stdout
        os.unlink(script.name)
        match = re.search(r"tps = ([0-9.]+)", out)
        if match is None:
            raise RuntimeError(f"no tps in pgbench output:\n{out}")
        return float(match.group(1))
    finally:
        subprocess.run([*psql, f"DROP TABLE {table}"], check=True)


async def run(reactor: Any, seconds: float) -> list[dict[str, Any]]:
    scratch = tempfile.mkdtemp(prefix="bench-sql-", dir=os.path.join(ROOT, "var"))
    rows: list[dict[str, Any]] = []
    try:
        for callers in CALLERS:
            made: dict[str, JournalService[Any]] = {}
            base = os.path.join(scratch, f"c{callers}")
            snaps = FileSnapshotStore(os.path.join(base, "snapshots"))
            made["file"] = JournalService(bank, os.path.join(base, "file"), snapshot_on_stop=False)
            made["sqlite"] = JournalService(
                bank, journal=SQLiteJournal(os.path.join(base, "j.db")), snapshots=snaps,
                snapshot_on_stop=False,
            )
            prefix = f"txj_bench_{uuid.uuid4().hex[:8]}"
            made["postgresql"] = JournalService(
                bank, journal=PostgresJournal(DSN, table_prefix=prefix), snapshots=snaps,
                snapshot_on_stop=False,
            )
            figures = {name: await measure(reactor, svc, callers, seconds) for name, svc in made.items()}
            subprocess.run(
                ["psql", DSN, "-q", "-c", f"DROP TABLE IF EXISTS {prefix}_records, {prefix}_meta"],
                check=True,
            )
            tps = pgbench(callers, seconds)
            for name, fig in figures.items():
                rows.append({
                    "label": f"txjournal {name} journal, {callers} caller(s)",
                    **fig, "ratio_to_file": fig["rate"] / figures["file"]["rate"],
                })
            rows.append({
                "label": f"pgbench one-row INSERT, {callers} client(s)", "rate": tps,
                "ratio_pg_journal_to_pgbench": figures["postgresql"]["rate"] / tps,
            })
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    os.makedirs(os.path.join(ROOT, "var"), exist_ok=True)

    async def go(reactor: Any) -> None:
        rows = await run(reactor, args.seconds)
        for row in rows:
            extra = "  ".join(
                f"{k} {v:.3g}" for k, v in row.items() if k.startswith("ratio")
            )
            p50 = f"p50 {row['p50_ms']:.3f} ms" if "p50_ms" in row else ""
            print(f"{row['label']:<48} {row['rate']:>10,.0f}/s  {p50:<16} {extra}")
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        out = os.path.join(ROOT, "bench", "results", f"sql-{time.strftime('%Y%m%dT%H%M%S')}.json")
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"results written to {out}")

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
