#!/usr/bin/env python
"""
The whole benchmark suite, side by side on this machine, in one run.

    .venv/bin/pip install -e '.[bench]'         # ZODB, eventsourcing, matplotlib
    .venv/bin/python bench/run_all.py --quick   # under 2 minutes
    .venv/bin/python bench/run_all.py --chart bench/results/all.png   # under 15 minutes

Runs each part as its own process, one after the other (so that no two
share the disk or the CPUs, and each reports its own memory):

- ``bench_core.py``: baselines (write+fdatasync per record and batched),
  txjournal in-process with 1 to 1,000 callers, replay of ``--replay-count``
  commands against decoding alone, and replay memory at two lengths;
- ``bench_peers.py``: Redis ``appendfsync always`` (``redis-benchmark`` with
  1 and 50 clients, plain and ``-P 16``), ZODB FileStorage and eventsourcing
  on SQLite doing the same deposits;
- ``bench_pb.py``: ``twistd journal`` over Perspective Broker on loopback,
  with 1 and 50 clients and ``execute_many`` pipelining;
- ``bench_snapshot.py``: a snapshot of a ``--snapshot-mib`` model and the
  longest reactor stall it causes;
- ``bench_overload.py``: 20,000 callers firing without waiting at a service
  with a smaller ``max_pending``.

Prints one table with every figure and its ratios to its baselines, then the
targets met and missed; writes ``bench/results/all-<timestamp>.json`` and,
with ``--chart``, a PNG. A part that cannot run is listed with the reason.
Scratch directories go under ``var/`` (the real disk, never tmpfs); every
process started is stopped before the part returns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    BENCH,
    Result,
    Skipped,
    add_ratios,
    check_targets,
    compare_table,
    format_table,
    load_part,
    log,
    machine_info,
    run_child,
    scratch_dir,
    write_json,
)

PARTS = ("core", "peers", "pb", "snapshot", "overload")
SCRIPTS = {
    "core": "bench_core.py",
    "peers": "bench_peers.py",
    "pb": "bench_pb.py",
    "snapshot": "bench_snapshot.py",
    "overload": "bench_overload.py",
}
#: generous limits per part (seconds), full mode; quick mode uses a third
TIMEOUTS = {"core": 420, "peers": 300, "pb": 240, "snapshot": 600, "overload": 300}
GROUP_ORDER = ["baseline", "in-process", "unsafe", "pb", "peer", "replay", "snapshot",
               "overload"]


def part_args(part: str, args: argparse.Namespace, base: str, out: str) -> list[str]:
    argv = [os.path.join(BENCH, SCRIPTS[part]), "--no-table", "--json-out", out, "--dir", base]
    if args.quick:
        argv.append("--quick")
    if args.keep:
        argv.append("--keep")
    if part == "core":
        if args.replay_count is not None:
            argv += ["--replay-count", str(args.replay_count)]
        if args.no_unsafe:
            argv.append("--no-unsafe")
    if part == "snapshot" and args.snapshot_mib:
        argv += ["--snapshot-mib", str(args.snapshot_mib)]
    if part == "pb" and args.pb_client_procs:
        argv += ["--pb-client-procs", str(args.pb_client_procs)]
    return argv


def main() -> None:
    args = parse_args()
    parts = [p for p in PARTS if p in (args.only.split(",") if args.only else PARTS)]
    parts = [p for p in parts if p not in (args.skip.split(",") if args.skip else [])]
    base = os.path.abspath(args.dir or os.path.join(os.path.dirname(BENCH), "var"))
    probe = scratch_dir(base, "bench-all-")  # refuses tmpfs
    mode = "quick" if args.quick else "full"
    info = machine_info(probe, mode)
    info["directory"] = base
    os.rmdir(probe)
    results: list[Result] = []
    skipped: list[Skipped] = []
    settings: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for part in parts:
        log(f"== {part} ==")
        t0 = time.perf_counter()
        fd, out = tempfile.mkstemp(prefix=f"bench-{part}-", suffix=".json")
        os.close(fd)
        timeout = TIMEOUTS[part] / (3 if args.quick else 1)
        if part == "core" and args.replay_count:
            timeout += args.replay_count / 20_000
        if part == "snapshot" and args.snapshot_mib:
            timeout = max(timeout, 120 + args.snapshot_mib * 0.5)
        try:
            run_child(part_args(part, args, base, out), timeout, expect_json=False,
                      new_session=True)
            with open(out) as f:
                payload = json.load(f)
            r, s = load_part(payload)
            results += r
            skipped += s
            settings[part] = payload.get("settings", {})
        except Exception as e:
            s = Skipped(part, f"part {part}", f"{type(e).__name__}: {e}")
            skipped.append(s)
            log(f"  SKIPPED {s.label}: {s.reason}")
        finally:
            os.unlink(out)
        seconds[part] = time.perf_counter() - t0
        log(f"   {part} took {seconds[part]:.1f} s")
    info["total_seconds"] = time.perf_counter() - started
    info["part_seconds"] = seconds
    info["loadavg_after"] = os.getloadavg()

    results.sort(key=lambda r: GROUP_ORDER.index(r.group) if r.group in GROUP_ORDER else 99)
    by_key = {r.key: r for r in results}
    add_ratios(by_key)
    targets = check_targets(by_key)
    print(format_table("txjournal benchmark suite, side by side", results, info, skipped,
                       targets))
    if args.compare:
        print(compare_table(results, args.compare))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    payload = {
        "benchmark": "all",
        "timestamp": stamp,
        "mode": mode,
        "settings": settings,
        "info": info,
        "results": results,
        "skipped": skipped,
        "targets": targets,
    }
    path = write_json("all", payload)
    print(f"total {info['total_seconds']:.1f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); results written to "
          f"{path}")
    if args.chart:
        try:
            from chart import draw

            with open(path) as f:
                draw(json.load(f), args.chart)
            print(f"chart written to {args.chart}")
        except ImportError as e:
            print(f"no chart: {e} (pip install -e '.[bench]' installs matplotlib)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="short runs and small sizes (under 2 minutes)")
    parser.add_argument("--dir", help="where scratch directories go (default: var/; not tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep scratch directories")
    parser.add_argument("--chart", metavar="PATH", help="also draw the results as a PNG")
    parser.add_argument("--only", help=f"comma-separated parts to run: {','.join(PARTS)}")
    parser.add_argument("--skip", help="comma-separated parts not to run")
    parser.add_argument("--replay-count", type=int, metavar="N",
                        help="commands to replay (default 1,000,000; --quick 100,000)")
    parser.add_argument("--snapshot-mib", type=int, metavar="MIB",
                        help="size of the snapshot benchmark's model (default 1024; --quick 64)")
    parser.add_argument("--pb-client-procs", type=int, metavar="N",
                        help="client processes sharing the 50 PB connections (default 5)")
    parser.add_argument("--no-unsafe", action="store_true",
                        help="skip the sync=False reference row")
    parser.add_argument("--compare", metavar="JSON",
                        help="also print each figure next to the same one in an earlier "
                             "results file (bench/results/*.json, docs/bench.json)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
