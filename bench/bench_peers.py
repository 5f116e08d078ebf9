#!/usr/bin/env python
"""
Peers doing the same durable work on the same disk: Redis with
``appendfsync always``, ZODB FileStorage and the ``eventsourcing`` library on
SQLite.

    .venv/bin/python bench/bench_peers.py [--quick] [--only redis,zodb,eventsourcing]

- Redis: ``redis-server --appendonly yes --appendfsync always --save ''`` on a
  free loopback port with its directory under ``var/``, started and killed
  by this script, driven by ``redis-benchmark -t set`` with 1 and 50 clients
  and with 16-deep pipelining (``-P 16``), over 1000 random keys; figures
  come from its ``--csv`` output. Each run's size is calibrated by a short
  first run so that it takes about the configured time.
- ZODB: a ``FileStorage`` (which fsyncs every commit) holding an ``OOBTree``
  of 100 account balances; one thread commits one deposit per transaction.
- eventsourcing: an ``Application`` with persistence module
  ``eventsourcing.sqlite`` on a file database (WAL mode, synchronous FULL),
  100 ``Account`` aggregates; one thread saves one ``Deposited`` event per
  call, with the aggregate cache on (``AGGREGATE_CACHE_MAXSIZE``) so that
  aggregates are not rebuilt from their events on every deposit.

A peer that is not installed, fails, or does not finish in time is skipped
with the reason printed. ZODB and eventsourcing run in child processes (the
``bench`` extra installs them: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    Result,
    Skipped,
    add_common_options,
    announce,
    announce_skip,
    dir_bytes,
    finish_part,
    free_port,
    latency_ms,
    log,
    machine_info,
    peak_rss_mib,
    process_peak_rss_mib,
    run_child,
    scratch_dir,
    stop_process,
)

ACCOUNTS = 100
PEERS = ("redis", "zodb", "eventsourcing")


@dataclass
class Settings:
    seconds: float
    redis_clients: tuple[int, ...]
    redis_pipeline: int


QUICK = Settings(2.0, (1, 50), 16)
FULL = Settings(6.0, (1, 50), 16)


# -- Redis -----------------------------------------------------------------------------


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not listen on 127.0.0.1:{port} in {timeout:.0f} s")


def redis_benchmark(port: int, clients: int, pipeline: int, requests: int, timeout: float) -> dict[str, float]:
    """One ``redis-benchmark -t set`` run; its CSV line as numbers (rps, p50_latency_ms, ...)."""
    args = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set",
            "-n", str(requests), "-c", str(clients), "-r", "1000", "--csv"]
    if pipeline > 1:
        args += ["-P", str(pipeline)]
    started = time.perf_counter()
    out = subprocess.run(args, capture_output=True, timeout=timeout, check=True).stdout
    elapsed = time.perf_counter() - started
    rows = list(csv.DictReader(io.StringIO(out.decode())))
    row = next((r for r in rows if r.get("test") == "SET"), None)
    if row is None:
        raise RuntimeError(f"no SET line in redis-benchmark's output: {out[:300]!r}")
    figures = {k: float(v) for k, v in row.items() if k != "test"}
    figures["wall_seconds"] = elapsed
    return figures


def run_redis(directory: str, settings: Settings) -> tuple[list[Result], list[Skipped]]:
    label = "Redis appendfsync always"
    missing = [t for t in ("redis-server", "redis-benchmark") if shutil.which(t) is None]
    if missing:
        return [], [Skipped("redis", label, f"{' and '.join(missing)} not on PATH "
                             "(apt-get install redis-server redis-tools)")]
    datadir = os.path.join(directory, "redis")
    os.makedirs(datadir, mode=0o700)
    port = free_port()
    logfile = os.path.join(directory, "redis.log")
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--dir", datadir, "--daemonize", "no"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    results: list[Result] = []
    skipped: list[Skipped] = []
    try:
        wait_for_port(port, proc, 10)
        log(f"peers: redis-server on 127.0.0.1:{port}, pid {proc.pid}, dir {datadir}")
        runs = [(c, 1) for c in settings.redis_clients]
        runs += [(c, settings.redis_pipeline) for c in settings.redis_clients]
        for clients, pipeline in runs:
            key = f"redis_c{clients}" + (f"_p{pipeline}" if pipeline > 1 else "")
            text = f"Redis SET appendfsync always, {clients} client{'s' if clients > 1 else ''}"
            if pipeline > 1:
                text += f", -P {pipeline}"
            try:
                probe = redis_benchmark(port, clients, pipeline, 2000 * clients if pipeline == 1
                                        else 2000 * clients * pipeline // 4, 120)
                requests = int(max(1000, min(5_000_000, probe["rps"] * settings.seconds)))
                figures = redis_benchmark(port, clients, pipeline, requests,
                                          settings.seconds * 4 + 60)
            except Exception as e:
                s = Skipped(key, text, f"redis-benchmark failed: {type(e).__name__}: {e}")
                skipped.append(s)
                announce_skip(s)
                continue
            rate = figures["rps"]
            r = Result(
                key, text, requests, requests / rate, rate, figures["p50_latency_ms"],
                figures["p99_latency_ms"], figures["max_latency_ms"], group="peer",
                note=(f"redis-benchmark -t set -n {requests} -c {clients}"
                      + (f" -P {pipeline}" if pipeline > 1 else "") + " -r 1000; "
                      + "latency per request"
                      + (" (a pipelined request waits for its whole pipeline)"
                         if pipeline > 1 else "")),
                rss_mib=process_peak_rss_mib(proc.pid), extra={"redis_csv": figures},
            )
            results.append(r)
            announce(r)
    except Exception as e:
        s = Skipped("redis", label, f"{type(e).__name__}: {e}")
        skipped.append(s)
        announce_skip(s)
    finally:
        stop_process(proc)
        with open(logfile, "rb") as f:
            output = f.read().decode("utf-8", "replace")
    aof = dir_bytes(datadir)
    if results:
        results[-1].note += f"; AOF directory {aof / 1e6:.1f} MB after the runs"
    if proc.returncode not in (0, -15) and not results:
        skipped.append(Skipped("redis", label, f"redis-server exited with {proc.returncode}: "
                                               f"{output[-300:]}"))
    return results, skipped


# -- ZODB ------------------------------------------------------------------------------


def child_zodb(datadir: str, seconds: float) -> dict[str, Any]:
    import transaction
    from BTrees.OOBTree import OOBTree
    from ZODB import DB
    from ZODB.FileStorage import FileStorage

    os.makedirs(datadir, exist_ok=True)
    db = DB(FileStorage(os.path.join(datadir, "bank.fs")))
    try:
        conn = db.open()
        root = conn.root()
        root["accounts"] = accounts = OOBTree()
        for i in range(ACCOUNTS):
            accounts[f"acct{i}"] = 0
        transaction.commit()
        names = [f"acct{i}" for i in range(ACCOUNTS)]
        latencies: list[float] = []
        clock = time.perf_counter
        commit = transaction.commit
        start = now = clock()
        deadline = start + seconds
        i = 0
        while now < deadline:
            t0 = now
            name = names[i % ACCOUNTS]
            accounts[name] = accounts[name] + 1
            commit()
            now = clock()
            latencies.append(now - t0)
            i += 1
        elapsed = now - start
        total = sum(accounts.values())
        conn.close()
    finally:
        db.close()
    assert total == len(latencies)
    return {"count": len(latencies), "seconds": elapsed, "latencies": latencies,
            "peak_rss_mib": peak_rss_mib(), "bytes": dir_bytes(datadir)}


# -- eventsourcing ---------------------------------------------------------------------


def child_eventsourcing(datadir: str, seconds: float) -> dict[str, Any]:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Account(Aggregate):
        @event("Opened")
        def __init__(self, name: str) -> None:
            self.name = name
            self.balance = 0

        @event("Deposited")
        def deposit(self, amount: int) -> None:
            self.balance += amount

    class Bank(Application[Any]):
        def open(self, name: str) -> Any:
            account = Account(name)
            self.save(account)
            return account.id

        def deposit(self, account_id: Any, amount: int) -> int:
            account = self.repository.get(account_id)
            account.deposit(amount)
            self.save(account)
            return int(account.balance)

    os.makedirs(datadir, exist_ok=True)
    db = os.path.join(datadir, "bank.sqlite")
    app = Bank(env={
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": db,
        "AGGREGATE_CACHE_MAXSIZE": str(ACCOUNTS * 2),
    })
    recorder = type(app.recorder).__name__
    ids = [app.open(f"acct{i}") for i in range(ACCOUNTS)]
    latencies: list[float] = []
    clock = time.perf_counter
    deposit = app.deposit
    start = now = clock()
    deadline = start + seconds
    i = 0
    while now < deadline:
        t0 = now
        deposit(ids[i % ACCOUNTS], 1)
        now = clock()
        latencies.append(now - t0)
        i += 1
    elapsed = now - start
    total = sum(app.repository.get(a).balance for a in ids)
    app.close()
    assert total == len(latencies)
    return {"count": len(latencies), "seconds": elapsed, "latencies": latencies,
            "peak_rss_mib": peak_rss_mib(), "bytes": dir_bytes(datadir), "recorder": recorder}


def run_child_peer(name: str, label: str, directory: str, settings: Settings) -> tuple[list[Result], list[Skipped]]:
    datadir = os.path.join(directory, name)
    try:
        figures = run_child(
            [os.path.abspath(__file__), "--child", name, "--child-dir", datadir,
             "--seconds", str(settings.seconds)],
            timeout=settings.seconds + 120,
        )
    except Exception as e:
        s = Skipped(name, label, f"{type(e).__name__}: {e} (see the child's error above)")
        announce_skip(s)
        return [], [s]
    if "skip" in figures:
        s = Skipped(name, label, figures["skip"])
        announce_skip(s)
        return [], [s]
    latencies = figures["latencies"]
    p50, p99 = latency_ms(latencies)
    count, seconds = figures["count"], figures["seconds"]
    note = f"{figures['bytes'] / 1e6:.1f} MB on disk after the run"
    if name == "zodb":
        note = "FileStorage fsync per commit, OOBTree of 100 balances; " + note
    else:
        note = (f"{figures['recorder']}, WAL, one Deposited event per save, aggregate cache "
                f"on; " + note)
    r = Result(name, label, count, seconds, count / seconds, p50, p99, max(latencies) * 1e3,
               rss_mib=figures["peak_rss_mib"], group="peer", note=note)
    announce(r)
    return [r], []


def run(args: argparse.Namespace, settings: Settings, directory: str) -> tuple[list[Result], list[Skipped]]:
    only = set(args.only.split(",")) if args.only else set(PEERS)
    results: list[Result] = []
    skipped: list[Skipped] = []
    if "redis" in only:
        r, s = run_redis(directory, settings)
        results += r
        skipped += s
    if "zodb" in only:
        log("peers: ZODB FileStorage, 1 thread")
        r, s = run_child_peer("zodb", "ZODB FileStorage commit per deposit, 1 thread",
                              directory, settings)
        results += r
        skipped += s
    if "eventsourcing" in only:
        log("peers: eventsourcing on SQLite, 1 thread")
        r, s = run_child_peer("eventsourcing", "eventsourcing SQLite event per deposit, 1 thread",
                              directory, settings)
        results += r
        skipped += s
    return results, skipped


def main() -> None:
    args = parse_args()
    if args.child:
        child = {"zodb": child_zodb, "eventsourcing": child_eventsourcing}[args.child]
        try:
            figures = child(args.child_dir, args.seconds)
        except ImportError as e:
            figures = {"skip": f"not installed ({e}); pip install -e '.[bench]' installs it"}
        print(json.dumps(figures))
        return
    settings = QUICK if args.quick else FULL
    if args.peer_seconds:
        settings.seconds = args.peer_seconds
    directory = scratch_dir(args.dir, "bench-peers-")
    info = machine_info(directory, "quick" if args.quick else "full")
    started = time.perf_counter()
    try:
        results, skipped = run(args, settings, directory)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    finish_part("peers", "peers", args, asdict(settings), info, results, skipped, started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_options(parser)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--peer-seconds", type=float, metavar="S", help="seconds per run")
    parser.add_argument("--child", choices=["zodb", "eventsourcing"], help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
