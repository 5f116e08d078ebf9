#!/usr/bin/env python
"""
Core benchmark: txjournal against bare ``write`` + ``fdatasync`` loops, in
one run, on this machine's disk.

    .venv/bin/python bench/bench_core.py            # about a minute
    .venv/bin/python bench/bench_core.py --quick    # under 30 s
    .venv/bin/python bench/bench_core.py --replay-count 2000000

Measures, each on a fresh directory under ``var/`` (same disk as the repo;
never tmpfs):

- baseline A: one 100-byte ``os.write`` + ``os.fdatasync`` per record;
- baseline B: the same, 1000 records per ``write`` + ``fdatasync``;
- txjournal in-process, ``sync=True``, with 1, 10, 100 and 1000 concurrent
  callers, each looping ``await service.execute(Deposit(...))``: commands/s,
  p50/p99 latency, batches written and mean batch size;
- txjournal ``sync=False`` (UNSAFE: acknowledges before the disk has the
  data) with 1000 callers, for reference;
- replay: a journal of ``--replay-count`` commands (default 1,000,000; 100,000
  with ``--quick``), then a cold start (``startService``: open, replay and
  execute) in a fresh child process, whose peak RSS is reported, and a
  decode-only pass (``FileJournal.replay`` + ``schema.decode``), with the page
  cache for the journal dropped first; the cold start is repeated on a
  journal of ``--replay-small-count`` commands (default a fifth) to show that
  replay memory does not grow with the journal's length.

Prints a table with every figure and its ratio to the relevant baseline and
writes the same as JSON to ``bench/results/core-<timestamp>.json``.
``bench/run_all.py`` runs this and the other parts side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    Result,
    add_common_options,
    announce,
    current_rss_mib,
    drop_cache,
    finish_part,
    latency_ms,
    log,
    machine_info,
    peak_rss_mib,
    run_child,
    scratch_dir,
)
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import react

from examples.bank import Deposit, Transfer, bank
from txjournal import JournalService
from txjournal.journal.file import FileJournal
from txjournal.record import encode_record

RECORD = b"x" * 99 + b"\n"  # the baselines' 100-byte record
BATCH = 1000  # baseline B's records per write + fdatasync


@dataclass
class Settings:
    baseline_a_seconds: float
    baseline_b_batches: int
    run_seconds: float
    callers: tuple[int, ...]
    replay_commands: int
    replay_small_commands: int


QUICK = Settings(1.5, 200, 1.5, (1, 10, 100, 1000), 100_000, 20_000)
FULL = Settings(5.0, 2000, 6.0, (1, 10, 100, 1000), 1_000_000, 200_000)


# -- baselines ---------------------------------------------------------------------


def baseline_a(directory: str, seconds: float) -> Result:
    path = os.path.join(directory, "baseline-a.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    latencies: list[float] = []
    clock = time.perf_counter
    try:
        start = clock()
        deadline = start + seconds
        now = start
        while now < deadline:
            t0 = now
            os.write(fd, RECORD)
            os.fdatasync(fd)
            now = clock()
            latencies.append(now - t0)
        elapsed = now - start
    finally:
        os.close(fd)
    p50, p99 = latency_ms(latencies)
    return Result(
        "baseline_a", "baseline A: write+fdatasync per 100 B record",
        len(latencies), elapsed, len(latencies) / elapsed, p50, p99, max(latencies) * 1e3,
        batches=len(latencies), mean_batch=1.0, group="baseline",
    )


def baseline_b(directory: str, batches: int) -> Result:
    path = os.path.join(directory, "baseline-b.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    chunk = RECORD * BATCH
    latencies: list[float] = []
    clock = time.perf_counter
    try:
        start = clock()
        for _ in range(batches):
            t0 = clock()
            os.write(fd, chunk)
            os.fdatasync(fd)
            latencies.append(clock() - t0)
        elapsed = clock() - start
    finally:
        os.close(fd)
    p50, p99 = latency_ms(latencies)
    count = batches * BATCH
    return Result(
        "baseline_b", f"baseline B: {BATCH} records per write+fdatasync",
        count, elapsed, count / elapsed, p50, p99, max(latencies) * 1e3,
        batches=batches, mean_batch=float(BATCH), group="baseline",
        note="latency = one batch's write+fdatasync",
    )


# -- txjournal ----------------------------------------------------------------------


def new_service(datadir: str, sync: bool) -> JournalService[Any]:
    return JournalService(
        bank, datadir=datadir, sync=sync, snapshot_interval=None, snapshot_on_stop=False
    )


async def run_callers(directory: str, callers: int, seconds: float, sync: bool) -> Result:
    datadir = os.path.join(directory, f"tx-{'sync' if sync else 'nosync'}-{callers}")
    service = new_service(datadir, sync)
    service.startService()
    latencies: list[float] = []
    clock = time.perf_counter
    execute = service.execute
    deadline = 0.0

    async def caller(i: int) -> None:
        account = f"acct{i}"
        record = latencies.append
        while clock() < deadline:
            t0 = clock()
            await execute(Deposit(account, 1))
            record(clock() - t0)

    gc.collect()
    start = clock()
    deadline = start + seconds
    await gatherResults([ensureDeferred(caller(i)) for i in range(callers)])
    elapsed = clock() - start
    engine = service.engine
    batches = getattr(engine, "batches", None)
    records = getattr(engine, "records", None)
    applied = engine.applied_seq
    await service.stopService()
    assert applied == len(latencies), (applied, len(latencies))
    p50, p99 = latency_ms(latencies)
    label = f"txjournal in-process sync=True, {callers} caller{'s' if callers > 1 else ''}"
    if not sync:
        label = f"txjournal in-process sync=False (UNSAFE), {callers} callers"
    return Result(
        f"tx_{'sync' if sync else 'nosync'}_{callers}", label,
        len(latencies), elapsed, len(latencies) / elapsed, p50, p99, max(latencies) * 1e3,
        batches=batches, mean_batch=records / batches if batches and records else None,
        rss_mib=peak_rss_mib(), safe=sync, group="in-process" if sync else "unsafe",
        note="" if sync else "acks before the data is durable; not a valid configuration",
    )


def write_journal(datadir: str, count: int) -> float:
    """
    N commands as the engine would journal them (deposits and transfers over
    1000 accounts), written straight through FileJournal in synced batches.
    """
    journal = FileJournal(os.path.join(datadir, "journal"))
    os.makedirs(datadir, mode=0o700, exist_ok=True)
    journal.open()
    for _ in journal.replay():
        pass
    start = time.perf_counter()
    time_ns = time.time_ns()
    seq = 1
    while seq <= count:
        last = min(count, seq + 4999)
        parts = []
        for s in range(seq, last + 1):
            if s % 2 or s < 2000:
                command: Any = Deposit(f"acct{s % 1000}", 1 + s % 97)
            else:
                command = Transfer(f"acct{s % 1000}", f"acct{(s * 7) % 1000}", 1 + s % 13)
            ctype, payload = bank.encode(command)
            parts.append(encode_record(
                journal.salt, s, time_ns + s, ctype.name_bytes, ctype.version, payload
            ))
        journal.append(b"".join(parts), seq, last)
        seq = last + 1
    journal.close()
    return time.perf_counter() - start


def journal_bytes(datadir: str) -> int:
    path = os.path.join(datadir, "journal")
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def child_cold_start(datadir: str, count: int) -> dict[str, Any]:
    """In a fresh process: startService (replay + execute) on datadir; figures as JSON."""
    gc.collect()
    rss_before = current_rss_mib()
    service = new_service(datadir, True)
    start = time.perf_counter()
    service.startService()
    elapsed = time.perf_counter() - start
    peak = peak_rss_mib()
    replayed = service.replayed
    total = service.query("total")
    accounts = len(service.model.accounts)
    service.stopService()
    assert replayed == count, (replayed, count)
    return {
        "seconds": elapsed, "replayed": replayed, "peak_rss_mib": peak,
        "rss_before_mib": rss_before, "total": total, "accounts": accounts,
    }


def cold_start(datadir: str, count: int, key: str, timeout: float) -> Result:
    drop_cache(datadir)
    figures = run_child(
        [os.path.abspath(__file__), "--child-cold-start", datadir, "--replay-count", str(count)],
        timeout,
    )
    growth = figures["peak_rss_mib"] - figures["rss_before_mib"]
    return Result(
        key, f"replay {count:,}: cold start (startService) in a child",
        count, figures["seconds"], count / figures["seconds"], rss_mib=figures["peak_rss_mib"],
        group="replay",
        note=(f"page cache dropped first; fresh process: {figures['rss_before_mib']:.1f} MiB "
              f"before startService, peak {figures['peak_rss_mib']:.1f} MiB (+{growth:.1f}); "
              f"model total {figures['total']} in {figures['accounts']} accounts"),
        extra={"rss_growth_mib": growth, "rss_before_mib": figures["rss_before_mib"]},
    )


def decode_only(datadir: str, count: int, key: str) -> Result:
    drop_cache(datadir)
    gc.collect()
    start = time.perf_counter()
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    decode = bank.decode
    n = 0
    for r in journal.replay():
        decode(r.name, r.version, r.fields)
        n += 1
    elapsed = time.perf_counter() - start
    journal.close()
    assert n == count
    return Result(
        key, f"replay {count:,}: decode only (FileJournal.replay+decode)", count,
        elapsed, count / elapsed, group="replay", note="page cache dropped first",
    )


def frames_only(datadir: str, count: int, key: str) -> Result:
    start = time.perf_counter()
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    n = sum(1 for _ in journal.replay())
    elapsed = time.perf_counter() - start
    journal.close()
    assert n == count
    return Result(
        key, f"replay {count:,}: frames only (CRC, no decode)", count,
        elapsed, count / elapsed, group="replay", note="page cache warm",
    )


def replay_results(directory: str, count: int, small: int) -> list[Result]:
    results = []
    timeout = 120 + count / 20_000  # even at 20,000/s it ends
    datadir = os.path.join(directory, "replay")
    seconds = write_journal(datadir, count)
    size = journal_bytes(datadir)
    results.append(Result(
        "replay_write", f"replay {count:,}: journal written directly, 5000/batch",
        count, seconds, count / seconds, group="replay",
        note=f"{size / 1e6:.1f} MB on disk, {size / count:.0f} B/record",
    ))
    results.append(cold_start(datadir, count, "replay_cold_start", timeout))
    results.append(decode_only(datadir, count, "replay_decode_only"))
    results.append(frames_only(datadir, count, "replay_frames_only"))
    shutil.rmtree(datadir, ignore_errors=True)
    if small:
        datadir = os.path.join(directory, "replay-small")
        write_journal(datadir, small)
        results.append(cold_start(datadir, small, "replay_cold_start_small", timeout))
        results.append(decode_only(datadir, small, "replay_decode_only_small"))
        shutil.rmtree(datadir, ignore_errors=True)
    return results


async def main(reactor: Any, args: argparse.Namespace) -> None:
    settings = QUICK if args.quick else FULL
    if args.replay_count is not None:
        settings.replay_commands = args.replay_count
        settings.replay_small_commands = args.replay_count // 5
    if args.replay_small_count is not None:
        settings.replay_small_commands = args.replay_small_count
    directory = scratch_dir(args.dir, "bench-core-")
    info = machine_info(directory, "quick" if args.quick else "full")
    results: list[Result] = []

    def done(r: Result) -> None:
        if r.rss_mib is None and r.group != "replay":
            r.rss_mib = peak_rss_mib()
        results.append(r)
        announce(r)

    started = time.perf_counter()
    log(f"core: baselines and in-process txjournal in {directory}")
    try:
        done(baseline_a(directory, settings.baseline_a_seconds))
        done(baseline_b(directory, settings.baseline_b_batches))
        for callers in settings.callers:
            done(await run_callers(directory, callers, settings.run_seconds, sync=True))
        if not args.no_unsafe:
            done(await run_callers(directory, 1000, settings.run_seconds, sync=False))
        if settings.replay_commands:
            log(f"core: replay of {settings.replay_commands:,} and "
                f"{settings.replay_small_commands:,} commands")
            for r in replay_results(
                directory, settings.replay_commands, settings.replay_small_commands
            ):
                done(r)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    info["peak_rss_mib"] = peak_rss_mib()
    finish_part("core", "core", args, asdict(settings), info, results, [], started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_options(parser)
    parser.add_argument(
        "--replay-count", type=int, metavar="N",
        help="commands in the replay journal (default 1,000,000; --quick 100,000; 0: no replay)",
    )
    parser.add_argument(
        "--replay-small-count", type=int, metavar="N",
        help="commands in the second, shorter replay journal (default a fifth; 0: none)",
    )
    parser.add_argument(
        "--no-unsafe", action="store_true", help="skip the sync=False reference row"
    )
    parser.add_argument("--child-cold-start", metavar="DATADIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child_cold_start:
        print(json.dumps(child_cold_start(arguments.child_cold_start, arguments.replay_count)))
    else:
        react(lambda reactor: ensureDeferred(main(reactor, arguments)))
