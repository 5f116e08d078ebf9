#!/usr/bin/env python
"""
Snapshot of a big model: how long it takes and how long it stalls the reactor.

    .venv/bin/python bench/bench_snapshot.py [--quick] [--snapshot-mib 1024]

Builds a model of about ``--snapshot-mib`` MiB (default 1024; 64 with
``--quick``) directly in memory: ``{"customers": {...}, "touched": 0}``, whose
``customers`` dict maps ``"cust000001234"`` to a tuple ``(id, "Customer 1234",
balance, tier)`` (ints and a str), about 300 bytes of Python objects per
entry, so about 3.5 million entries per GiB. Entries are added until the
process's RSS has grown by the requested size, then ``gc.collect()`` (which
untracks the tuples of atomic values, as it would in a long-running server).

A ``JournalService`` (``sync=True``) is started on a fresh directory under
``var/`` with a schema whose model factory returns that model, one command
is executed (so there is something to snapshot), and:

- idle: a ``LoopingCall`` heartbeat every 1 ms records the gaps between its
  ticks for a second, while one caller executes small commands in a loop;
- snapshot: the same heartbeat and caller while ``JournalService.snapshot()``
  runs; the longest gap is the longest the reactor was stalled, and the
  caller's latencies show whether commands kept flowing;
- replay process: the same heartbeat and caller while ``snapshot()`` runs
  with ``snapshot_app`` set, so a new process loads the snapshot just
  written, replays the commands since and writes the next one (the reactor
  only starts it); the five longest gaps and when they began are kept in
  the JSON for both kinds of snapshot, each with how much of it the
  reactor spent inside its poll (asleep, waiting to be woken);
- baseline: a bare ``pickle.dumps`` of the same model on the reactor thread
  (what a naive snapshot would stall for).

Runs alone in its own process; ``run_all.py`` starts it as a child.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
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
    dir_bytes,
    finish_part,
    latency_ms,
    log,
    machine_info,
    peak_rss_mib,
    percentile,
    scratch_dir,
)
from snapmodel import MODEL, Touch, snapschema
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater, react

from txjournal import JournalService

#: The benchmark's schema by import path, for the replay-process snapshot.
REPLAY_APP = "snapmodel:snapschema"


@dataclass
class Settings:
    model_mib: int
    idle_seconds: float
    heartbeat_ms: float


QUICK = Settings(64, 0.5, 1.0)
FULL = Settings(1024, 1.0, 1.0)


def build_model(mib: int) -> tuple[dict[str, Any], int, float, float]:
    """The model, its entries, its measured size in MiB and the seconds it took."""
    gc.collect()
    start_rss = current_rss_mib()
    started = time.perf_counter()
    customers: dict[str, tuple[int, str, int, int]] = {}
    i = 0
    step = 20_000
    while current_rss_mib() - start_rss < mib:
        for j in range(i, i + step):
            customers[f"cust{j:09d}"] = (j, f"Customer {j}", (j * 7919) % 100_000 + 1000, j % 50)
        i += step
    model = {"customers": customers, "touched": 0}
    gc.collect()
    return model, i, current_rss_mib() - start_rss, time.perf_counter() - started


class Heartbeat:
    """
    A LoopingCall that records (previous tick, this tick) for every tick, and
    when the reactor sat in its poll (epoll_wait): a gap spent there is time
    the thread was asleep and not woken on time, not work on the reactor.
    """

    def __init__(self, interval: float, reactor: Any) -> None:
        self.ticks: list[tuple[float, float]] = []
        self.polls: list[tuple[float, float]] = []
        self._last = 0.0
        self._loop = LoopingCall(self._tick)
        self.interval = interval
        poll = reactor.doIteration
        polls = self.polls
        clock = time.perf_counter

        def timed_poll(timeout: float | None) -> None:
            t0 = clock()
            poll(timeout)
            polls.append((t0, clock()))

        reactor.doIteration = timed_poll

    def _tick(self) -> None:
        now = time.perf_counter()
        self.ticks.append((self._last, now))
        self._last = now

    def start(self) -> None:
        self._last = time.perf_counter()
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        self._loop.stop()

    def gaps_ms(self, t0: float, t1: float) -> list[float]:
        """Gaps ending after t0 and starting before t1, in ms, sorted."""
        return sorted((b - a) * 1e3 for a, b in self.ticks if b > t0 and a < t1)

    def longest(self, t0: float, t1: float, n: int = 5) -> list[tuple[float, float, float]]:
        """
        The ``n`` longest gaps in the window: (ms, when it began in s after
        t0, ms of it the reactor spent inside its poll).
        """
        gaps = sorted(((b - a, a, b) for a, b in self.ticks if b > t0 and a < t1), reverse=True)
        out = []
        for length, a, b in gaps[:n]:
            polled = sum(min(e, b) - max(s, a) for s, e in self.polls if e > a and s < b)
            out.append((round(length * 1e3, 1), round(a - t0, 3), round(polled * 1e3, 1)))
        return out


class Caller:
    """One caller executing Touch in a loop; latencies with their end times."""

    def __init__(self, service: JournalService[Any]) -> None:
        self.service = service
        self.samples: list[tuple[float, float]] = []  # (end, latency)
        self.running = True
        self.done: Deferred[None] = ensureDeferred(self._loop())

    async def _loop(self) -> None:
        from twisted.internet import reactor

        clock = time.perf_counter
        n = 0
        while self.running:
            n += 1
            t0 = clock()
            await self.service.execute(Touch(n))
            t1 = clock()
            self.samples.append((t1, t1 - t0))
            # ~1000 commands/s: traffic, without hogging the reactor
            await deferLater(reactor, 0.001, lambda: None)

    def between(self, t0: float, t1: float) -> list[float]:
        return [lat for end, lat in self.samples if t0 < end and end - lat < t1]


async def main(reactor: Any, args: argparse.Namespace) -> None:
    settings = QUICK if args.quick else FULL
    if args.snapshot_mib:
        settings.model_mib = args.snapshot_mib
    directory = scratch_dir(args.dir, "bench-snapshot-")
    info = machine_info(directory, "quick" if args.quick else "full")
    started = time.perf_counter()
    results: list[Result] = []
    mib = settings.model_mib
    try:
        log(f"snapshot: building a model of about {mib} MiB")
        model, entries, model_mib, build_seconds = build_model(mib)
        MODEL.append(model)
        log(f"snapshot: {entries:,} entries, RSS grew {model_mib:.0f} MiB in {build_seconds:.1f} s")
        datadir = os.path.join(directory, "data")
        service = JournalService(snapschema, datadir=datadir, sync=True,
                                 snapshot_interval=None, snapshot_on_stop=False,
                                 keep_snapshots=1, snapshot_app=REPLAY_APP)
        service.startService()
        service.snapshot_app = None  # the default first: a forked child
        assert service.model is model
        await service.execute(Touch(0))

        heartbeat = Heartbeat(settings.heartbeat_ms / 1e3, reactor)
        heartbeat.start()
        caller = Caller(service)
        idle_t0 = time.perf_counter()
        await deferLater(reactor, settings.idle_seconds, lambda: None)
        idle_t1 = time.perf_counter()

        snap_t0 = time.perf_counter()
        seq = await service.snapshot()
        snap_t1 = time.perf_counter()
        pause_ms = service.last_snapshot_pause * 1e3
        snap_bytes = dir_bytes(os.path.join(datadir, "snapshots"))
        await deferLater(reactor, 0.2, lambda: None)

        # The same again, written by a process that loads the snapshot just
        # written and replays the commands since (snapshot_app).
        service.snapshot_app = REPLAY_APP
        replay_t0 = time.perf_counter()
        replay_seq = await service.snapshot()
        replay_t1 = time.perf_counter()
        replay_pause_ms = service.last_snapshot_pause * 1e3
        replay_bytes = dir_bytes(os.path.join(datadir, "snapshots"))
        await deferLater(reactor, 0.05, lambda: None)
        caller.running = False
        await caller.done
        heartbeat.stop()
        await service.stopService()

        common_extra = {"model_mib": round(model_mib), "entries": entries}
        # a gap that spans the end of the idle second counts for the snapshot only
        idle = sorted((b - a) * 1e3 for a, b in heartbeat.ticks if idle_t0 < b <= idle_t1)
        idle_lat = caller.between(idle_t0, idle_t1)
        results.append(Result(
            "snapshot_idle", f"snapshot {mib} MiB: idle heartbeat (1 ms LoopingCall)",
            len(idle), idle_t1 - idle_t0, None, percentile(idle, 50), percentile(idle, 99),
            idle[-1] if idle else None, group="snapshot",
            note="gaps between 1 ms heartbeat ticks, one caller executing commands meanwhile",
            extra=common_extra,
        ))

        def during_snapshot(
            key: str, label: str, t0: float, t1: float, note: str, commands_label: str,
            commands_note: str, **extra: Any,
        ) -> None:
            """The snapshot's row (heartbeat gaps) and its commands' row (latencies)."""
            gaps = heartbeat.gaps_ms(t0, t1)
            during = caller.between(t0, t1)
            p50c, p99c = latency_ms(during) if during else (float("nan"), float("nan"))
            results.append(Result(
                key, f"snapshot {mib} MiB: {label}",
                1, t1 - t0, None, percentile(gaps, 50), percentile(gaps, 99),
                gaps[-1] if gaps else None, group="snapshot", note=note,
                extra=dict(common_extra, **extra, commands_during=len(during),
                           longest_gaps=heartbeat.longest(t0, t1),
                           command_max_ms=max(during, default=0) * 1e3, gaps=len(gaps)),
            ))
            results.append(Result(
                f"{key}_commands", f"snapshot {mib} MiB: {commands_label}",
                len(during), t1 - t0, len(during) / (t1 - t0), p50c, p99c,
                max(during, default=0) * 1e3, group="snapshot", note=commands_note,
                extra=dict(common_extra, idle_max_ms=max(idle_lat, default=0) * 1e3),
            ))

        during_snapshot(
            "snapshot", "JournalService.snapshot()", snap_t0, snap_t1,
            note=(f"model: {entries:,} customer tuples, {model_mib:.0f} MiB of RSS, built in "
                  f"{build_seconds:.1f} s; snapshot at seq {seq}: {snap_bytes / 2**20:.0f} MiB "
                  f"on disk; the fork paused the reactor {pause_ms:.1f} ms; "
                  f"p50/p99/max ms = heartbeat gaps during the snapshot"),
            commands_label="commands during the snapshot",
            commands_note=(f"one caller executing a small command about every ms; latency "
                           f"while idle p50 {latency_ms(idle_lat)[0]:.2f} ms, max "
                           f"{max(idle_lat, default=0) * 1e3:.1f} ms"),
            snapshot_bytes=snap_bytes, fork_pause_ms=pause_ms,
        )
        during_snapshot(
            "snapshot_replay", "snapshot() with snapshot_app (replay process)",
            replay_t0, replay_t1,
            note=(f"snapshot at seq {replay_seq} written by a new process that loaded the "
                  f"snapshot at {seq} and replayed {replay_seq - seq} commands: "
                  f"{replay_bytes / 2**20:.0f} MiB on disk; starting it paused the reactor "
                  f"{replay_pause_ms:.1f} ms; p50/p99/max ms = heartbeat gaps meanwhile"),
            commands_label="commands during the replay-process snapshot",
            commands_note="one caller executing a small command about every ms",
            snapshot_bytes=replay_bytes, start_pause_ms=replay_pause_ms,
            replayed=replay_seq - seq,
        )
        for r in results:
            announce(r)

        gc.collect()
        t0 = time.perf_counter()
        payload = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        elapsed = time.perf_counter() - t0
        size = len(payload)
        del payload
        r = Result(
            "snapshot_pickle", f"snapshot {mib} MiB: bare pickle.dumps (blocking)",
            1, elapsed, None, max_ms=elapsed * 1e3, group="snapshot", rss_mib=peak_rss_mib(),
            note=f"{size / 2**20:.0f} MiB of pickle; a snapshot taken this way on the reactor "
                 f"thread stalls it for max ms",
            extra=common_extra,
        )
        results.append(r)
        announce(r)
        for r in results:
            r.rss_mib = peak_rss_mib()
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    info["peak_rss_mib"] = peak_rss_mib()
    finish_part("snapshot", "snapshot", args, asdict(settings), info, results, [], started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_options(parser)
    parser.add_argument("--snapshot-mib", type=int, metavar="MIB",
                        help="model size in MiB (default 1024; --quick 64)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
