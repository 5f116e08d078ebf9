"""
Shared pieces of the benchmark scripts: the result row, percentiles, memory
figures, machine information, child processes, ratios, the table and the
JSON file.

Not a test module and not part of the package: the scripts in ``bench/`` put
this directory on ``sys.path`` themselves.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
for _path in (ROOT, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@dataclass
class Result:
    """One row of the table (and of the JSON file)."""

    key: str
    label: str
    count: int = 0
    seconds: float = 0.0
    rate: float | None = None  # records or commands per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    batches: int | None = None
    mean_batch: float | None = None
    rss_mib: float | None = None  # peak RSS of the process that did the work
    group: str = ""
    safe: bool = True
    note: str = ""
    ratios: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Skipped:
    """A benchmark that could not run, and why (always printed)."""

    key: str
    label: str
    reason: str


# -- figures ---------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def latency_ms(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds of latencies in seconds."""
    ordered = sorted(latencies)
    return percentile(ordered, 50) * 1e3, percentile(ordered, 99) * 1e3


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    # fields 14 and 15 of stat(5) are utime and stime; after_name starts at field 3
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")


def process_peak_rss_mib(pid: int) -> float | None:
    """Another process's peak RSS (VmHWM), or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dir_bytes(directory: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


# -- where and on what -------------------------------------------------------------


def scratch_dir(base: str | None, prefix: str) -> str:
    """A fresh directory under ``base`` (default: ``var/`` of the checkout), refusing tmpfs."""
    base = os.path.abspath(base or os.path.join(ROOT, "var"))
    os.makedirs(base, mode=0o700, exist_ok=True)
    directory = tempfile.mkdtemp(prefix=prefix, dir=base)
    fstype = mount_of(directory)[1]
    if fstype in ("tmpfs", "ramfs"):
        os.rmdir(directory)
        raise SystemExit(f"{directory} is on {fstype}: fsync would measure nothing")
    return directory


def mount_of(directory: str) -> tuple[str, str]:
    device, fstype, best = "?", "?", ""
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fs = line.split()[:3]
            if (directory + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, device, fstype = mnt, dev, fs
    return device, fstype


def machine_info(directory: str, mode: str) -> dict[str, Any]:
    device, fstype = mount_of(directory)
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
        "loadavg_before": os.getloadavg(),
    }


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout holds the table only."""
    print(message, file=sys.stderr, flush=True)


def announce(r: Result) -> None:
    parts = []
    if r.rate is not None:
        parts.append(f"{r.rate:,.0f}/s")
    if r.p50_ms is not None:
        parts.append(f"p50 {r.p50_ms:.3f} ms")
    if r.max_ms is not None:
        parts.append(f"max {r.max_ms:.1f} ms")
    if r.rate is None and r.seconds:
        parts.append(f"{r.seconds:.2f} s")
    if r.rss_mib is not None:
        parts.append(f"RSS {r.rss_mib:.0f} MiB")
    log(f"  {r.label}: {', '.join(parts)}")


def announce_skip(s: Skipped) -> None:
    log(f"  SKIPPED {s.label}: {s.reason}")


# -- child processes -----------------------------------------------------------------


def python_env() -> dict[str, str]:
    path = os.pathsep.join([ROOT, BENCH] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def run_child(
    args: list[str], timeout: float, expect_json: bool = True, new_session: bool = False
) -> dict[str, Any]:
    """
    Run ``python ARGS`` (a bench script in child mode), which prints one JSON
    object as its last line of stdout; return it (``{}`` if not
    ``expect_json``). Its stderr is passed through. The child is stopped if
    it outlives ``timeout`` seconds or this process is interrupted.

    ``new_session``: run the child in its own process group, and stop the
    whole group; ``run_all.py`` runs each part so, and parts start their own
    children (servers, clients) in the part's group, so that stopping a part
    stops everything it started.
    """
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, env=python_env(), cwd=ROOT,
        start_new_session=new_session,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise RuntimeError(f"{' '.join(args[:2])} took longer than {timeout:.0f} s") from None
    except BaseException:
        stop_process(proc)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exited with {proc.returncode}")
    lines = out.decode().strip().splitlines()
    if not expect_json:
        return {}
    if not lines:
        raise RuntimeError(f"{' '.join(args[:2])} printed nothing")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """
    SIGTERM a child we started (its whole process group if it leads one),
    then SIGKILL if it has not exited after ``grace`` seconds.
    """
    if proc.poll() is not None:
        return
    try:
        leader = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return

    def send(sig: int) -> None:
        try:
            if leader:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


# -- ratios, targets, output -------------------------------------------------------


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def add_ratios(results: dict[str, Result]) -> None:
    """
    Every figure against its baseline, for whichever rows are present:

    - ``rate/A``, ``p50/A``, ``p99/A``: against baseline A (one
      ``write``+``fdatasync`` per record), the floor of durable one-at-a-time
      writes on this disk; ``rate/B`` against baseline B (batched);
    - PB rows against Redis (``appendfsync always``) at the same concurrency
      and pipelining (``rate/redis``, ``p50/redis``), and against txjournal
      in-process (``rate/inproc``);
    - ZODB and eventsourcing against txjournal in-process with 1 caller;
    - replay against decode-only, decode-only against frames-only, the long
      replay's RSS against the short one's;
    - the snapshot's reactor stall against the idle heartbeat's longest
      gap, its duration against a bare ``pickle.dumps`` of the same model;
    - overload RSS against the same process idle, its acknowledged rate
      against 1000 in-process callers without overload.
    """
    get = results.get

    def put(r: Result, name: str, value: float | None) -> None:
        if value is not None:
            r.ratios[name] = value

    a, b = get("baseline_a"), get("baseline_b")
    inproc1 = get("tx_sync_1")
    pb_vs = {"pb_1": "redis_c1", "pb_50": "redis_c50", "pb_many16_50": "redis_c50_p16",
             "pb_many16_1": "redis_c1_p16"}
    pb_inproc = {"pb_1": "tx_sync_1", "pb_50": "tx_sync_100", "pb_many16_50": "tx_sync_1000",
                 "pb_many16_1": "tx_sync_10"}
    for key, r in results.items():
        if key == "baseline_b" and a:
            put(r, "rate/A", _ratio(r.rate, a.rate))
        if key.startswith(("tx_", "pb_", "redis_", "zodb", "eventsourcing")) and a:
            put(r, "rate/A", _ratio(r.rate, a.rate))
            if key.startswith("tx_") and b:
                put(r, "rate/B", _ratio(r.rate, b.rate))
            put(r, "p50/A", _ratio(r.p50_ms, a.p50_ms))
            put(r, "p99/A", _ratio(r.p99_ms, a.p99_ms))
        if key in pb_vs and (redis := get(pb_vs[key])):
            put(r, "rate/redis", _ratio(r.rate, redis.rate))
            put(r, "p50/redis", _ratio(r.p50_ms, redis.p50_ms))
        if key in pb_inproc and (inproc := get(pb_inproc[key])):
            put(r, "rate/inproc", _ratio(r.rate, inproc.rate))
        if key.startswith(("zodb", "eventsourcing")) and inproc1:
            put(r, "rate/tx1", _ratio(r.rate, inproc1.rate))
    for suffix in ("", "_small"):
        cold, decode = get("replay_cold_start" + suffix), get("replay_decode_only" + suffix)
        frames = get("replay_frames_only" + suffix)
        if cold and decode:
            put(cold, "rate/decode", _ratio(cold.rate, decode.rate))
        if decode and frames:
            put(decode, "rate/frames", _ratio(decode.rate, frames.rate))
    big, small = get("replay_cold_start"), get("replay_cold_start_small")
    if big and small:
        put(big, "RSS/small", _ratio(big.rss_mib, small.rss_mib))
        grow_big, grow_small = big.extra.get("rss_growth_mib"), small.extra.get("rss_growth_mib")
        put(big, "growth/small", _ratio(grow_big, grow_small))
    idle, snap, pickled = get("snapshot_idle"), get("snapshot"), get("snapshot_pickle")
    if snap and idle:
        put(snap, "max/idle max", _ratio(snap.max_ms, idle.max_ms))
    if snap and pickled:
        put(snap, "time/pickle", _ratio(snap.seconds, pickled.seconds))
    commands = get("snapshot_commands")
    if commands:
        put(commands, "max/idle max", _ratio(commands.max_ms, commands.extra.get("idle_max_ms")))
    replay = get("snapshot_replay")
    if replay and idle:
        put(replay, "max/idle max", _ratio(replay.max_ms, idle.max_ms))
    if replay and snap:
        put(replay, "max/fork max", _ratio(replay.max_ms, snap.max_ms))
        put(replay, "time/fork", _ratio(replay.seconds, snap.seconds))
    commands = get("snapshot_replay_commands")
    if commands:
        put(commands, "max/idle max", _ratio(commands.max_ms, commands.extra.get("idle_max_ms")))
    over = get("overload")
    if over:
        put(over, "RSS/idle", _ratio(over.rss_mib, over.extra.get("idle_rss_mib")))
        if (ref := get("tx_sync_1000")):
            put(over, "rate/inproc", _ratio(over.rate, ref.rate))


@dataclass
class Target:
    name: str
    met: bool | None  # None: not measured in this run
    detail: str


def check_targets(results: dict[str, Result]) -> list[Target]:
    """The goals of the benchmark issue, each met, missed or not measured."""
    get = results.get
    out: list[Target] = []

    tx1000 = get("tx_sync_1000")
    out.append(Target(
        ">= 100,000 durable commands/s in-process with 1,000 callers",
        None if tx1000 is None or tx1000.rate is None else tx1000.rate >= 100_000,
        f"{tx1000.rate:,.0f}/s" if tx1000 and tx1000.rate is not None else "not measured",
    ))

    tx1, a = get("tx_sync_1"), get("baseline_a")
    if tx1 and a and tx1.p50_ms is not None and a.p50_ms:
        ratio = tx1.p50_ms / a.p50_ms
        out.append(Target(
            "1-caller p50 <= 1.2x plain write+fdatasync p50", ratio <= 1.2,
            f"{tx1.p50_ms:.3f} ms vs {a.p50_ms:.3f} ms = {ratio:.2f}x",
        ))
    else:
        out.append(Target("1-caller p50 <= 1.2x plain write+fdatasync p50", None, "not measured"))

    cold, decode = get("replay_cold_start"), get("replay_decode_only")
    if cold and decode and cold.rate and decode.rate:
        half = cold.rate / decode.rate
        out.append(Target(
            "replay >= 500,000 commands/s and >= half the decode-only speed",
            cold.rate >= 500_000 and half >= 0.5,
            f"{cold.rate:,.0f}/s over {cold.count:,} commands, {half:.2f}x decode-only "
            f"({decode.rate:,.0f}/s)",
        ))
    else:
        out.append(Target("replay >= 500,000 commands/s and >= half the decode-only speed",
                          None, "not measured"))

    snap = get("snapshot")
    if snap and snap.max_ms is not None:
        out.append(Target(
            f"snapshot of a {snap.extra.get('model_mib', '?')} MiB model stalls the reactor "
            "<= 20 ms",
            snap.max_ms <= 20.0,
            f"longest heartbeat gap {snap.max_ms:.1f} ms, snapshot took {snap.seconds:.2f} s"
            + (f"; longest command latency meanwhile {commands.max_ms:.1f} ms"
               if (commands := get("snapshot_commands")) and commands.max_ms is not None else "")
            + ("" if snap.extra.get("model_mib", 0) >= 1000 else
               " (target is for ~1 GiB: this run used a smaller model)"),
        ))
    else:
        out.append(Target("1 GiB snapshot stall <= 20 ms", None, "not measured"))
    replay = get("snapshot_replay")
    if replay and replay.max_ms is not None:
        out.append(Target(
            f"snapshot of a {replay.extra.get('model_mib', '?')} MiB model written by a replay "
            "process (snapshot_app) stalls the reactor <= 20 ms",
            replay.max_ms <= 20.0,
            f"longest heartbeat gap {replay.max_ms:.1f} ms, snapshot took {replay.seconds:.2f} s"
            + (f"; longest command latency meanwhile {commands.max_ms:.1f} ms"
               if (commands := get("snapshot_replay_commands")) and commands.max_ms is not None
               else ""),
        ))

    pb50, redis50 = get("pb_50"), get("redis_c50")
    if pb50 and redis50 and pb50.rate and redis50.rate:
        ratio = pb50.rate / redis50.rate
        out.append(Target(
            "PB 50 clients >= half of Redis appendfsync-always 50 clients", ratio >= 0.5,
            f"{pb50.rate:,.0f}/s vs {redis50.rate:,.0f}/s = {ratio:.2f}x",
        ))
    else:
        out.append(Target("PB 50 clients >= half of Redis appendfsync-always 50 clients", None,
                          "not measured (PB or Redis skipped)"))
    return out


def fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


LABEL_WIDTH = 58


def format_table(
    title: str,
    results: Iterable[Result],
    info: dict[str, Any],
    skipped: Iterable[Skipped] = (),
    targets: Iterable[Target] = (),
) -> str:
    rows = list(results)
    lines = [""]
    lines.append(f"{title} ({info['mode']}): {info['machine']}")
    lines.append(f"directory {info['directory']} on {info['device']} ({info['fstype']})")
    before = "/".join(f"{x:.2f}" for x in info["loadavg_before"])
    after = "/".join(f"{x:.2f}" for x in info.get("loadavg_after", info["loadavg_before"]))
    lines.append(
        f"load average before {before}, after {after} (other work on the machine skews figures)"
    )
    head = (
        f"{'':{LABEL_WIDTH}} {'count':>9} {'secs':>6} {'per s':>10} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7} {'batches':>7} {'mean b':>6} {'RSS MiB':>7}  ratios"
    )
    lines.append(head)
    lines.append("-" * (len(head) + 44))
    group = None
    for r in rows:
        if group is not None and r.group != group:
            lines.append("")
        group = r.group
        ratios = "  ".join(f"{k} {v:.3g}" for k, v in r.ratios.items())
        lines.append(
            f"{r.label[:LABEL_WIDTH]:{LABEL_WIDTH}} {r.count:>9} {r.seconds:>6.2f} "
            f"{fmt(r.rate, '10,.0f'):>10} {fmt(r.p50_ms, '7.3f'):>7} {fmt(r.p99_ms, '7.3f'):>7} "
            f"{fmt(r.max_ms, '7.1f'):>7} {fmt(r.batches, 'd'):>7} {fmt(r.mean_batch, '6.1f'):>6} "
            f"{fmt(r.rss_mib, '7.1f'):>7}  {ratios}"
        )
    skipped = list(skipped)
    if skipped:
        lines.append("skipped:")
        lines.extend(f"  {s.label}: {s.reason}" for s in skipped)
    notes = [f"  {r.key}: {r.note}" for r in rows if r.note]
    if notes:
        lines.append("notes:")
        lines.extend(notes)
    lines.append(
        "RSS MiB: peak resident memory of the process that did the work (the benchmark "
        "process for in-process rows,\n        the server for PB rows, a fresh child for "
        "replay, snapshot and overload rows)"
    )
    lines.append(
        "ratios: rate/A, p50/A, p99/A = against baseline A (write+fdatasync per record); "
        "rate/B = against baseline B;\n"
        "        rate/redis, p50/redis = against Redis appendfsync always at the same "
        "clients and pipelining;\n"
        "        rate/inproc = against txjournal in-process (PB 1: 1 caller, PB 50: 100 "
        "callers, execute_many x50: 1000 callers; overload: 1000 callers);\n"
        "        rate/tx1 = against txjournal in-process with 1 caller; rate/decode = replay "
        "/ decode only; rate/frames = decode / frames only;\n"
        "        RSS/small, growth/small = long replay's peak RSS (growth over the idle "
        "process) / the short replay's;\n"
        "        max/idle max = longest reactor gap (command latency) during the snapshot / "
        "the same idle; time/pickle = snapshot time / bare pickle.dumps;\n"
        "        max/fork max, time/fork = the replay-process snapshot's longest gap / time "
        "against the forked one's;\n"
        "        RSS/idle = peak RSS under overload / RSS of the idle service"
    )
    targets = list(targets)
    if targets:
        lines.append("targets:")
        for t in targets:
            mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t.met]
            lines.append(f"  {mark} {t.name}: {t.detail}")
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any], path: str | None = None) -> str:
    if path is None:
        os.makedirs(RESULTS, exist_ok=True)
        stamp = payload.get("timestamp") or time.strftime("%Y%m%dT%H%M%S")
        path = os.path.join(RESULTS, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def part_payload(
    part: str, mode: str, settings: dict[str, Any], info: dict[str, Any],
    results: Iterable[Result], skipped: Iterable[Skipped] = (),
) -> dict[str, Any]:
    return {
        "benchmark": part,
        "timestamp": time.strftime("%Y%m%dT%H%M%S"),
        "mode": mode,
        "settings": settings,
        "info": info,
        "results": [asdict(r) for r in results],
        "skipped": [asdict(s) for s in skipped],
    }


def load_part(payload: dict[str, Any]) -> tuple[list[Result], list[Skipped]]:
    results = [Result.from_dict(r) for r in payload.get("results", [])]
    skipped = [Skipped(**s) for s in payload.get("skipped", [])]
    return results, skipped


def compare_table(results: list[Result], previous_path: str) -> str:
    """
    Each row next to the same row of an earlier results file (``--compare``):
    rate, p50 and peak RSS before and after, and after/before. Figures from
    different runs are only comparable in the same conditions (same machine,
    same load; see the load averages).
    """
    with open(previous_path) as f:
        payload = json.load(f)
    before = {r.key: r for r in load_part(payload)[0]}
    then = payload.get("info", {}).get("loadavg_before")
    lines = [
        f"before/after against {previous_path} ({payload.get('timestamp', '?')}, "
        f"{payload.get('mode', '?')} mode, load average then "
        f"{', '.join(f'{x:.2f}' for x in then) if then else '?'})",
        f"{'':58} {'rate before':>12} {'rate after':>12} {'x':>6} "
        f"{'p50 before':>10} {'p50 after':>10} {'x':>6} {'RSS bef.':>8} {'RSS aft.':>8}",
    ]

    def ratio(a: float | None, b: float | None) -> str:
        r = _ratio(a, b)
        return "-" if r is None else f"{r:.2f}"

    for r in results:
        old = before.get(r.key)
        if old is None:
            continue
        lines.append(
            f"{r.label[:58]:58} {fmt(old.rate, ',.0f'):>12} {fmt(r.rate, ',.0f'):>12} "
            f"{ratio(r.rate, old.rate):>6} {fmt(old.p50_ms, '.3f'):>10} "
            f"{fmt(r.p50_ms, '.3f'):>10} {ratio(r.p50_ms, old.p50_ms):>6} "
            f"{fmt(old.rss_mib, '.1f'):>8} {fmt(r.rss_mib, '.1f'):>8}"
        )
    missing = [k for k in before if k not in {r.key for r in results}]
    if missing:
        lines.append(f"not measured this time: {', '.join(missing)}")
    return "\n".join(lines)


def add_common_options(parser: Any) -> None:
    parser.add_argument("--quick", action="store_true", help="small counts and short runs")
    parser.add_argument(
        "--compare", metavar="JSON",
        help="also print each figure next to the same one in an earlier results file",
    )
    parser.add_argument(
        "--dir", help="parent of the scratch directory (default: var/ in the checkout; not tmpfs)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--json-out", metavar="PATH",
        help="write the JSON here (default: bench/results/<part>-<timestamp>.json)",
    )
    parser.add_argument(
        "--no-table", action="store_true", help="print no table (run_all.py prints one)"
    )


def finish_part(
    part: str, title: str, args: Any, settings: dict[str, Any], info: dict[str, Any],
    results: list[Result], skipped: list[Skipped], started: float,
) -> None:
    """Ratios, the table (unless --no-table) and the JSON file of one part run alone."""
    info["total_seconds"] = time.perf_counter() - started
    info["loadavg_after"] = os.getloadavg()
    by_key = {r.key: r for r in results}
    add_ratios(by_key)
    mode = "quick" if args.quick else "full"
    payload = part_payload(part, mode, settings, info, results, skipped)
    out = write_json(part, payload, args.json_out)
    if not args.no_table:
        targets = [t for t in check_targets(by_key) if t.met is not None]
        print(format_table(f"txjournal benchmark: {title}", results, info, skipped, targets))
        if getattr(args, "compare", None):
            print(compare_table(results, args.compare))
        print(f"total {info['total_seconds']:.1f} s; results written to {out}")
