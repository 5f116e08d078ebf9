#!/usr/bin/env python
"""
txjournal through Perspective Broker over loopback.

    .venv/bin/python bench/bench_pb.py [--quick] [--pb-client-procs 5]

Starts ``twistd -n journal --app examples.bank:bank`` (``sync`` on, no
snapshots) as a subprocess on a free loopback port with a fresh data
directory under ``var/``, waits for its "ready:" line, and drives it from
separate client processes (``bench/pb_client.py``), each with its own
reactor and several PB connections, so that the client side does not
starve the server of CPU on a small machine. Each connection logs in and
loops for a fixed time:

- 1 client: one connection calling ``execute("deposit", ...)``, one call at a time;
- 50 clients: ``--pb-client-procs`` processes (default 5) x 10 connections, each
  one call at a time;
- pipelined: ``execute_many`` with batches of 16 deposits, from 1 connection
  and from 50.

Reports commands/s, p50/p99 latency of a call (a whole batch for
``execute_many``), and the CPU the server and the clients used (server
near 100% of a core means the server is the bottleneck). After the server
stops, every acknowledged command is checked to be in its journal.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    BENCH,
    ROOT,
    Result,
    Skipped,
    add_common_options,
    announce,
    announce_skip,
    finish_part,
    free_port,
    latency_ms,
    log,
    machine_info,
    process_cpu_seconds,
    process_peak_rss_mib,
    python_env,
    scratch_dir,
    stop_process,
)

from txjournal.journal.file import FileJournal
from txjournal.users import add_user

USER = "bench"


@dataclass
class Settings:
    seconds: float
    client_procs: int
    clients: int
    batch: int


QUICK = Settings(2.0, 5, 50, 16)
FULL = Settings(8.0, 5, 50, 16)


class Server:
    """``twistd -n journal`` in a child process, its output collected by a thread."""

    def __init__(self, workdir: str, port: int) -> None:
        self.port = port
        self.datadir = os.path.join(workdir, "bank")
        self.lines: list[str] = []
        self._ready = threading.Event()
        args = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile", "", "--logfile", "-",
            "journal", "--app", "examples.bank:bank",
            "--datadir", self.datadir,
            "--users", os.path.join(workdir, "users"),
            "--pb", f"tcp:{port}:interface=127.0.0.1",
            "--snapshot-interval", "0", "--no-snapshot-on-stop",
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=python_env(), cwd=ROOT,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if len(self.lines) > 500:
                del self.lines[:250]
            if "ready:" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            tail = "\n".join(self.lines[-20:])
            raise RuntimeError(f"twistd journal did not become ready:\n{tail}")

    def cpu(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def peak_rss_mib(self) -> float | None:
        return process_peak_rss_mib(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, grace=15.0)


def start_clients(
    port: int, password_file: str, procs: int, connections: int, batch: int,
    seconds: float, tag: str,
) -> list[subprocess.Popen[bytes]]:
    """``procs`` client processes sharing ``connections`` connections between them."""
    clients = []
    per = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    for i, n in enumerate(per):
        if not n:
            continue
        clients.append(subprocess.Popen(
            [sys.executable, os.path.join(BENCH, "pb_client.py"), "--port", str(port),
             "--user", USER, "--password-file", password_file, "--connections", str(n),
             "--batch", str(batch), "--duration", str(seconds), "--prefix", f"{tag}-{i}-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=python_env(), cwd=ROOT,
        ))
    return clients


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of a child's stdout, or an error if none comes in time."""
    assert proc.stdout is not None
    stdout = proc.stdout
    box: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: box.put(stdout.readline()), daemon=True).start()
    try:
        return box.get(timeout=timeout).decode()
    except queue.Empty:
        raise RuntimeError(f"client {proc.pid} said nothing for {timeout:.0f} s") from None


def run_scenario(
    server: Server, password_file: str, key: str, label: str, procs: int, connections: int,
    batch: int, seconds: float,
) -> Result:
    clients = start_clients(server.port, password_file, procs, connections, batch, seconds, key)
    try:
        for c in clients:
            line = read_line(c, 60)
            if line.strip() != "ready":
                raise RuntimeError(f"client {c.pid} did not log in: {line!r}")
        cpu_before = server.cpu()
        wall = time.perf_counter()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write(b"go\n")
            c.stdin.flush()
        reports = []
        for c in clients:
            out, _ = c.communicate(timeout=seconds + 60)
            if c.returncode != 0:
                raise RuntimeError(f"client {c.pid} exited with {c.returncode}")
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
        wall = time.perf_counter() - wall
        server_cpu = server.cpu() - cpu_before
    finally:
        for c in clients:
            stop_process(c)
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise RuntimeError(f"{len(errors)} connections failed, first: {errors[0]}")
    count = sum(r["count"] for r in reports)
    elapsed = max(r["seconds"] for r in reports)
    latencies = [us / 1e6 for r in reports for us in r["latencies_us"]]
    p50, p99 = latency_ms(latencies)
    client_cpu = sum(r["cpu_seconds"] for r in reports)
    what = "execute" if batch == 1 else f"execute_many of {batch}"
    how = f"{len(clients)} process{'es' if len(clients) > 1 else ''} x {connections // len(clients)}"
    return Result(
        key, label, count, elapsed, count / elapsed, p50, p99, max(latencies) * 1e3,
        group="pb", rss_mib=server.peak_rss_mib(),
        note=(f"{what}, {connections} connection{'s' if connections > 1 else ''} in {how}; "
              f"CPU: server {server_cpu / wall:.0%} of a core ({server_cpu / count * 1e6:.0f} "
              f"us per command), clients {client_cpu / wall:.0%}; latency per call"),
        extra={"server_cpu_seconds": server_cpu, "client_cpu_seconds": client_cpu,
               "wall_seconds": wall, "client_procs": len(clients), "connections": connections,
               "batch": batch, "calls": len(latencies)},
    )


def count_journal(datadir: str) -> int:
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    n = sum(1 for _ in journal.replay())
    journal.close()
    return n


def run(args: argparse.Namespace, settings: Settings, directory: str) -> tuple[list[Result], list[Skipped]]:
    results: list[Result] = []
    skipped: list[Skipped] = []
    password_file = os.path.join(directory, "password")
    with open(os.open(password_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write("bench-password-0123456789\n")
    add_user(os.path.join(directory, "users"), USER, "rw", "bench-password-0123456789")
    port = free_port()
    server = Server(directory, port)
    procs = max(1, settings.client_procs)
    n, b = settings.clients, settings.batch
    scenarios = [
        ("pb_1", "PB execute, 1 client", 1, 1, 1),
        (f"pb_{n}", f"PB execute, {n} clients ({procs} procs)", procs, n, 1),
        (f"pb_many{b}_1", f"PB execute_many x{b}, 1 client", 1, 1, b),
        (f"pb_many{b}_{n}", f"PB execute_many x{b}, {n} clients ({procs} procs)", procs, n, b),
    ]
    acknowledged = 0
    try:
        server.wait_ready(60)
        log(f"pb: twistd journal ready on 127.0.0.1:{port}, pid {server.proc.pid}")
        for key, label, p, conns, batch in scenarios:
            try:
                r = run_scenario(server, password_file, key, label, p, conns, batch,
                                 settings.seconds)
            except Exception as e:
                s = Skipped(key, label, f"failed: {e}")
                skipped.append(s)
                announce_skip(s)
                continue
            acknowledged += r.count
            results.append(r)
            announce(r)
    finally:
        server.stop()
    if results:
        records = count_journal(server.datadir)
        ok = records >= acknowledged
        results[-1].note += (
            f"; after stop: {records:,} journal records for {acknowledged:,} acknowledged "
            f"commands ({'all durable' if ok else 'MISSING RECORDS'})"
        )
        if not ok:
            raise SystemExit(f"PB: only {records} journal records for {acknowledged} acks")
    return results, skipped


def main() -> None:
    args = parse_args()
    settings = QUICK if args.quick else FULL
    if args.pb_client_procs:
        settings.client_procs = args.pb_client_procs
    if args.pb_seconds:
        settings.seconds = args.pb_seconds
    directory = scratch_dir(args.dir, "bench-pb-")
    info = machine_info(directory, "quick" if args.quick else "full")
    started = time.perf_counter()
    try:
        results, skipped = run(args, settings, directory)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    finish_part("pb", "Perspective Broker", args, asdict(settings), info, results, skipped,
                started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_options(parser)
    parser.add_argument("--pb-client-procs", type=int, metavar="N",
                        help="client processes sharing the 50 connections (default 5)")
    parser.add_argument("--pb-seconds", type=float, metavar="S", help="seconds per scenario")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
