#!/usr/bin/env python
"""
Bounded memory under overload: callers far faster than the disk.

    .venv/bin/python bench/bench_overload.py [--quick] [--callers 20000] [--max-pending 5000]

In a fresh child process, a ``JournalService`` (``sync=True``, the example
bank) with ``max_pending`` smaller than the number of callers takes a
firehose: ``--callers`` callers each fire one deposit after another without
waiting for the previous one's outcome; on every reactor turn ``--chunk``
callers (default: all of them) fire, in rotation. Submitting and applying
share the reactor thread, so only bursts larger than ``max_pending`` (or a
slower disk) overload the service: with ``--chunk 1000`` the firehose is
throttled by the CPU and nothing is refused. Commands beyond
``max_pending`` fail at once with ``JournalOverloaded``. Reported: commands
acknowledged per second and their latency (from firing to acknowledgment),
attempts and refusals, the most commands ever pending, the process's RSS
idle, at its peak and sampled every 100 ms, and, after the service stopped,
the number of records in its journal, which must equal the commands
acknowledged (plus a warm-up): every acknowledged command is durable.

For contrast, the same firehose runs in a second child with ``max_pending``
effectively unbounded (10 million) for a shorter time (``--no-contrast``
skips it): there memory grows with the backlog.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    Result,
    Skipped,
    add_common_options,
    announce,
    announce_skip,
    current_rss_mib,
    finish_part,
    latency_ms,
    log,
    machine_info,
    peak_rss_mib,
    run_child,
    scratch_dir,
)
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import LoopingCall, deferLater, react

from examples.bank import Deposit, bank
from txjournal import JournalService
from txjournal.errors import JournalOverloaded
from txjournal.journal.file import FileJournal

WARMUP = 1000
UNBOUNDED = 10_000_000


@dataclass
class Settings:
    seconds: float
    callers: int
    chunk: int
    max_pending: int
    contrast_seconds: float


QUICK = Settings(2.0, 20_000, 20_000, 5_000, 1.0)
FULL = Settings(6.0, 20_000, 20_000, 5_000, 3.0)


async def child(
    reactor: Any, datadir: str, callers: int, chunk: int, max_pending: int, seconds: float
) -> dict[str, Any]:
    service = JournalService(bank, datadir=datadir, sync=True, snapshot_interval=None,
                             snapshot_on_stop=False, max_pending=max_pending)
    service.startService()
    for i in range(WARMUP // 100):
        await gatherResults([service.execute(Deposit(f"warm{i}", 1)) for _ in range(100)])
    gc.collect()
    idle_rss = current_rss_mib()
    engine = service.engine
    accounts = [f"acct{i}" for i in range(callers)]
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    samples: list[tuple[float, float, int]] = []  # (time, RSS MiB, pending)
    clock = time.perf_counter
    attempts = 0
    max_pending_seen = 0
    stop = False

    def sample() -> None:
        samples.append((clock() - start, current_rss_mib(), engine.pending))

    position = 0

    def wave() -> None:
        nonlocal attempts, max_pending_seen, position
        if stop:
            return
        fired = clock()
        record = latencies.append

        def ok(_: object) -> None:
            outcomes["ok"] += 1
            record(clock() - fired)

        def failed(f: Any) -> None:
            outcomes["overloaded" if f.check(JournalOverloaded) else f.type.__name__] += 1

        execute = service.execute
        for account in accounts[position:position + chunk]:
            execute(Deposit(account, 1)).addCallbacks(ok, failed)
        attempts += len(accounts[position:position + chunk])
        position = (position + chunk) % len(accounts)
        max_pending_seen = max(max_pending_seen, engine.pending)
        reactor.callLater(0, wave)

    sampler = LoopingCall(sample)
    start = clock()
    sampler.start(0.1)
    wave()
    await deferLater(reactor, seconds, lambda: None)
    stop = True
    fired_for = clock() - start
    await engine.wait_idle()
    drained = clock() - start
    sampler.stop()
    sample()
    total = service.query("total")
    await service.stopService()
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    records = sum(1 for _ in journal.replay())
    journal.close()
    p50, p99 = latency_ms(latencies)
    return {
        "attempts": attempts, "outcomes": dict(outcomes), "fired_seconds": fired_for,
        "drained_seconds": drained, "p50_ms": p50, "p99_ms": p99,
        "max_ms": max(latencies, default=0) * 1e3, "idle_rss_mib": idle_rss,
        "peak_rss_mib": peak_rss_mib(), "samples": samples, "max_pending_seen": max_pending_seen,
        "records": records, "warmup": WARMUP, "total": total,
    }


def to_result(key: str, label: str, f: dict[str, Any], callers: int, max_pending: int) -> Result:
    acked = f["outcomes"].get("ok", 0)
    overloaded = f["outcomes"].get("overloaded", 0)
    others = {k: v for k, v in f["outcomes"].items() if k not in ("ok", "overloaded")}
    samples = f["samples"]
    rss = [s[1] for s in samples]
    quarter = [max(rss[: max(1, len(rss) * q // 4)]) for q in (1, 2, 3, 4)]
    durable = f["records"] == f["warmup"] + acked and f["total"] == f["warmup"] + acked
    note = (
        f"{f['attempts'] / f['fired_seconds']:,.0f} attempts/s from {callers:,} callers for "
        f"{f['fired_seconds']:.1f} s; {overloaded:,} refused with JournalOverloaded"
        + (f", other errors {others}" if others else "")
        + f"; most pending {f['max_pending_seen']:,} (max_pending {max_pending:,}); RSS idle "
        f"{f['idle_rss_mib']:.0f} MiB, peak {f['peak_rss_mib']:.0f}, highest by each quarter "
        f"of the run {'/'.join(f'{x:.0f}' for x in quarter)}; drained {f['drained_seconds'] - f['fired_seconds']:.1f} s "
        f"after firing stopped; after stop {f['records']:,} journal records = "
        f"{f['warmup']:,} warm-up + {acked:,} acknowledged: "
        + ("all acknowledged commands durable" if durable else "MISMATCH")
    )
    return Result(
        key, label, acked, f["drained_seconds"], acked / f["drained_seconds"], f["p50_ms"],
        f["p99_ms"], f["max_ms"], rss_mib=f["peak_rss_mib"], group="overload", note=note,
        extra={"idle_rss_mib": f["idle_rss_mib"], "attempts": f["attempts"],
               "overloaded": overloaded, "other_errors": others,
               "max_pending_seen": f["max_pending_seen"], "records": f["records"],
               "durable": durable, "rss_samples": samples},
    )


def main() -> None:
    args = parse_args()
    settings = QUICK if args.quick else FULL
    if args.callers:
        settings.callers = args.callers
    if args.chunk:
        settings.chunk = args.chunk
    if args.max_pending:
        settings.max_pending = args.max_pending
    directory = scratch_dir(args.dir, "bench-overload-")
    info = machine_info(directory, "quick" if args.quick else "full")
    started = time.perf_counter()
    results: list[Result] = []
    skipped: list[Skipped] = []
    runs = [("overload", f"overload: {settings.callers:,} callers, max_pending "
             f"{settings.max_pending:,}", settings.max_pending, settings.seconds)]
    if not args.no_contrast:
        runs.append(("overload_unbounded", f"  same, max_pending {UNBOUNDED:,} (unbounded)",
                     UNBOUNDED, settings.contrast_seconds))
    try:
        for key, label, max_pending, seconds in runs:
            log(f"overload: {label}, {seconds:.0f} s")
            try:
                figures = run_child(
                    [os.path.abspath(__file__), "--child-dir", os.path.join(directory, key),
                     "--callers", str(settings.callers), "--chunk", str(settings.chunk),
                     "--max-pending", str(max_pending),
                     "--seconds", str(seconds)],
                    timeout=seconds * 20 + 120,
                )
            except Exception as e:
                s = Skipped(key, label, f"{type(e).__name__}: {e}")
                skipped.append(s)
                announce_skip(s)
                continue
            r = to_result(key, label, figures, settings.callers, max_pending)
            results.append(r)
            announce(r)
            if key == "overload" and not r.extra["durable"]:
                raise SystemExit(f"overload: {r.note}")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    finish_part("overload", "overload", args, asdict(settings), info, results, skipped, started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_options(parser)
    parser.add_argument("--callers", type=int, help="callers firing without waiting (20,000)")
    parser.add_argument("--chunk", type=int, help="callers firing per reactor turn (default: all)")
    parser.add_argument("--max-pending", type=int, help="the service's max_pending (5,000)")
    parser.add_argument("--no-contrast", action="store_true",
                        help="skip the run with max_pending unbounded")
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child_dir:
        async def run_one(reactor: Any) -> None:
            figures = await child(reactor, arguments.child_dir, arguments.callers,
                                  arguments.chunk, arguments.max_pending, arguments.seconds)
            print(json.dumps(figures))
        react(lambda reactor: ensureDeferred(run_one(reactor)))
    else:
        main()
