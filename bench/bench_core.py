#!/usr/bin/env python
"""
Core benchmark: txjournal against bare ``write`` + ``fdatasync`` loops, in
one run, on this machine's disk.

    .venv/bin/python bench/bench_core.py            # a minute or two
    .venv/bin/python bench/bench_core.py --quick    # under 30 s

Measures, each on a fresh directory under ``var/`` (same disk as the repo;
never tmpfs):

- baseline A: one 100-byte ``os.write`` + ``os.fdatasync`` per record;
- baseline B: the same, 1000 records per ``write`` + ``fdatasync``;
- txjournal in-process, ``sync=True``, with 1, 10, 100 and 1000 concurrent
  callers, each looping ``await service.execute(Deposit(...))``: commands/s,
  p50/p99 latency, batches written and mean batch size;
- txjournal ``sync=False`` (UNSAFE: acknowledges before the disk has the
  data) with 1000 callers, for reference;
- replay: a journal of N commands, then a cold start (``startService``:
  open, replay and execute) and a decode-only pass (``FileJournal.replay``
  + ``schema.decode``), with the page cache for the journal dropped first;
- peak RSS.

Prints a table with every figure and its ratio to the relevant baseline and
writes the same as JSON to ``bench/results/core-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet.defer import ensureDeferred, gatherResults  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from examples.bank import Deposit, Transfer, bank  # noqa: E402
from txjournal import JournalService  # noqa: E402
from txjournal.journal.file import FileJournal  # noqa: E402
from txjournal.record import encode_record  # noqa: E402

RECORD = b"x" * 99 + b"\n"  # the baselines' 100-byte record
BATCH = 1000  # baseline B's records per write + fdatasync


@dataclass
class Settings:
    baseline_a_seconds: float
    baseline_b_batches: int
    run_seconds: float
    callers: tuple[int, ...]
    replay_commands: int


QUICK = Settings(1.5, 200, 1.5, (1, 10, 100, 1000), 30_000)
FULL = Settings(5.0, 2000, 6.0, (1, 10, 100, 1000), 200_000)


@dataclass
class Result:
    """One row of the table."""

    key: str
    label: str
    count: int
    seconds: float
    rate: float  # records or commands per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    batches: int | None = None
    mean_batch: float | None = None
    safe: bool = True
    note: str = ""
    ratios: dict[str, float] = field(default_factory=dict)
    peak_rss_kib: int = 0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def latency_ms(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return percentile(ordered, 50) * 1e3, percentile(ordered, 99) * 1e3


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def drop_cache(directory: str) -> None:
    """Ask the kernel to forget the (clean, synced) pages of every file under directory."""
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


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
        len(latencies), elapsed, len(latencies) / elapsed, p50, p99,
        batches=len(latencies), mean_batch=1.0,
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
        count, elapsed, count / elapsed, p50, p99, batches=batches, mean_batch=float(BATCH),
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
    batches, records = engine.batches, engine.records
    applied = engine.applied_seq
    await service.stopService()
    assert records == applied == len(latencies), (records, applied, len(latencies))
    p50, p99 = latency_ms(latencies)
    label = f"txjournal sync=True, {callers} caller{'s' if callers > 1 else ''}"
    if not sync:
        label = f"txjournal sync=False (UNSAFE), {callers} callers"
    return Result(
        f"tx_{'sync' if sync else 'nosync'}_{callers}", label,
        len(latencies), elapsed, len(latencies) / elapsed, p50, p99,
        batches=batches, mean_batch=records / batches if batches else 0.0,
        safe=sync,
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


async def replay_results(directory: str, count: int) -> list[Result]:
    datadir = os.path.join(directory, "replay")
    write_seconds = write_journal(datadir, count)
    journal_bytes = sum(
        os.path.getsize(os.path.join(datadir, "journal", n))
        for n in os.listdir(os.path.join(datadir, "journal"))
    )
    results = [Result(
        "replay_write", "  (journal written directly, 5000/batch)", count, write_seconds,
        count / write_seconds, note=f"{journal_bytes / 1e6:.1f} MB on disk",
    )]

    drop_cache(datadir)
    gc.collect()
    service = new_service(datadir, True)
    start = time.perf_counter()
    service.startService()
    elapsed = time.perf_counter() - start
    assert service.replayed == count, (service.replayed, count)
    total = service.query("total")
    await service.stopService()
    results.append(Result(
        "replay_cold_start", "cold start: startService (replay + execute)", count, elapsed,
        count / elapsed, note=f"page cache dropped first; model total {total}",
        peak_rss_kib=peak_rss_kib(),
    ))

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
    assert n == count
    results.append(Result(
        "replay_decode_only", "decode only: FileJournal.replay + schema.decode", count,
        elapsed, count / elapsed, note="page cache dropped first", peak_rss_kib=peak_rss_kib(),
    ))

    start = time.perf_counter()
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    n = sum(1 for _ in journal.replay())
    elapsed = time.perf_counter() - start
    assert n == count
    results.append(Result(
        "replay_frames_only", "frames only: FileJournal.replay (CRC, no decode)", count,
        elapsed, count / elapsed, note="page cache warm", peak_rss_kib=peak_rss_kib(),
    ))
    return results


# -- report -------------------------------------------------------------------------


def add_ratios(results: dict[str, Result]) -> None:
    a, b = results["baseline_a"], results["baseline_b"]
    for key, r in results.items():
        if key.startswith("tx_"):
            r.ratios["rate/A"] = r.rate / a.rate
            r.ratios["rate/B"] = r.rate / b.rate
            if r.p50_ms is not None and a.p50_ms:
                r.ratios["p50/A p50"] = r.p50_ms / a.p50_ms
            if r.p99_ms is not None and a.p99_ms:
                r.ratios["p99/A p99"] = r.p99_ms / a.p99_ms
        elif key == "baseline_b":
            r.ratios["rate/A"] = r.rate / a.rate
    decode = results.get("replay_decode_only")
    frames = results.get("replay_frames_only")
    cold = results.get("replay_cold_start")
    if decode and cold:
        cold.ratios["rate/decode"] = cold.rate / decode.rate
    if decode and frames:
        decode.ratios["rate/frames"] = decode.rate / frames.rate


def fmt(value: float | int | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def print_table(results: dict[str, Result], info: dict[str, Any]) -> None:
    print()
    print(f"txjournal core benchmark ({info['mode']}): {info['machine']}")
    print(f"directory {info['directory']} on {info['device']} ({info['fstype']})")
    before = "/".join(f"{x:.2f}" for x in info["loadavg_before"])
    after = "/".join(f"{x:.2f}" for x in info["loadavg_after"])
    print(f"load average before {before}, after {after} (other work on the machine skews figures)")
    head = (
        f"{'':53} {'count':>8} {'secs':>6} {'per s':>9} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'batches':>8} {'mean b':>7} {'RSS MiB':>7}  ratios"
    )
    print(head)
    print("-" * (len(head) + 40))
    for r in results.values():
        ratios = "  ".join(f"{k} {v:.3g}" for k, v in r.ratios.items())
        print(
            f"{r.label:53} {r.count:>8} {r.seconds:>6.2f} {r.rate:>9,.0f} "
            f"{fmt(r.p50_ms, '7.3f'):>7} {fmt(r.p99_ms, '7.3f'):>7} "
            f"{fmt(r.batches, 'd'):>8} {fmt(r.mean_batch, '7.1f'):>7} "
            f"{r.peak_rss_kib / 1024:>7.1f}  {ratios}"
        )
    notes = [f"  {r.key}: {r.note}" for r in results.values() if r.note]
    if notes:
        print("notes:")
        print("\n".join(notes))
    print(f"peak RSS of the whole run: {info['peak_rss_kib'] / 1024:.1f} MiB "
          "(RSS MiB column: peak so far after each row)")
    print(
        "ratios: rate/A = throughput / baseline A records/s; rate/B = / baseline B "
        "records/s;\n        p50/A p50, p99/A p99 = latency / baseline A per-record "
        "latency;\n        rate/decode = cold start / decode only; rate/frames = "
        "decode only / frames only"
    )


def machine_info(directory: str, mode: str) -> dict[str, Any]:
    st = os.stat(directory)
    device, fstype = "?", "?"
    best = ""
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fs = line.split()[:3]
            if (directory + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, device, fstype = mnt, dev, fs
    return {
        "mode": mode,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "python": sys.version,
        "platform": platform.platform(),
        "directory": directory,
        "device": device,
        "fstype": fstype,
        "st_dev": st.st_dev,
        "loadavg_before": os.getloadavg(),
    }


async def main(reactor: Any, args: argparse.Namespace) -> None:
    settings = QUICK if args.quick else FULL
    base = args.dir or os.path.join(ROOT, "var")
    os.makedirs(base, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="bench-core-", dir=base)
    info = machine_info(directory, "quick" if args.quick else "full")
    if info["fstype"] in ("tmpfs", "ramfs"):
        raise SystemExit(f"{directory} is on {info['fstype']}: fsync would measure nothing")
    results: dict[str, Result] = {}

    def done(r: Result) -> None:
        r.peak_rss_kib = r.peak_rss_kib or peak_rss_kib()
        results[r.key] = r
        rate = f"{r.rate:,.0f}/s"
        lat = f", p50 {r.p50_ms:.3f} ms" if r.p50_ms is not None else ""
        print(f"  {r.label}: {rate}{lat}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        done(baseline_a(directory, settings.baseline_a_seconds))
        done(baseline_b(directory, settings.baseline_b_batches))
        for callers in settings.callers:
            done(await run_callers(directory, callers, settings.run_seconds, sync=True))
        done(await run_callers(directory, 1000, settings.run_seconds, sync=False))
        for r in await replay_results(directory, settings.replay_commands):
            done(r)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    info["total_seconds"] = time.perf_counter() - started
    info["peak_rss_kib"] = peak_rss_kib()
    info["loadavg_after"] = os.getloadavg()
    add_ratios(results)
    print_table(results, info)

    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = os.path.join(out_dir, f"core-{stamp}.json")
    with open(out, "w") as f:
        json.dump(
            {
                "benchmark": "core",
                "timestamp": stamp,
                "settings": asdict(settings),
                "info": info,
                "results": {k: asdict(r) for k, r in results.items()},
            },
            f,
            indent=2,
        )
        f.write("\n")
    print(f"total {info['total_seconds']:.1f} s; results written to {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts, under 30 s")
    parser.add_argument(
        "--dir", help="parent of the scratch directory (default: var/ in the checkout)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
