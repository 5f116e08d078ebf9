#!/usr/bin/env python
"""
One PB client process of ``bench_pb.py`` (not meant to be run by hand).

Opens ``--connections`` connections to a ``twistd journal`` serving
``examples.bank:bank``, logs each in, prints ``ready``, waits for a line on
stdin, then has every connection loop for ``--duration`` seconds: one
``execute("deposit", ...)`` at a time, or one ``execute_many`` of
``--batch`` deposits at a time. Prints one JSON line: counts, latencies (in
microseconds, one per call), errors and the CPU this process used.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import react
from twisted.spread import pb


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(reactor: Any, args: argparse.Namespace) -> None:
    with open(args.password_file) as f:
        password = f.read().strip().encode()
    avatars = []
    factories = []
    for _ in range(args.connections):
        factory = pb.PBClientFactory()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", args.port, timeout=30).connect(factory)
        avatars.append(await factory.login(UsernamePassword(args.user.encode(), password)))
        factories.append(factory)
    for avatar in avatars:  # warm up: first calls pay for imports and caches
        for _ in range(3):
            await avatar.callRemote("execute", "deposit", {"account": "warmup", "amount": 1})

    go: Deferred[None] = Deferred()

    def wait_for_go() -> None:
        sys.stdin.readline()
        reactor.callFromThread(go.callback, None)

    threading.Thread(target=wait_for_go, daemon=True).start()
    print("ready", flush=True)
    await go

    clock = time.perf_counter
    latencies: list[int] = []
    counts = [0]
    errors: list[str] = []
    cpu_start = cpu()
    start = clock()
    deadline = start + args.duration

    async def single(avatar: Any, account: str) -> None:
        kwargs = {"account": account, "amount": 1}
        record = latencies.append
        n = 0
        while clock() < deadline:
            t0 = clock()
            await avatar.callRemote("execute", "deposit", kwargs)
            record(int((clock() - t0) * 1e6))
            n += 1
        counts[0] += n

    async def many(avatar: Any, account: str) -> None:
        calls = [["deposit", {"account": account, "amount": 1}]] * args.batch
        record = latencies.append
        n = 0
        while clock() < deadline:
            t0 = clock()
            outcomes = await avatar.callRemote("execute_many", calls)
            record(int((clock() - t0) * 1e6))
            bad = [o for o in outcomes if "ok" not in o]
            if bad:
                raise RuntimeError(f"execute_many outcome: {bad[0]!r:.200}")
            n += len(outcomes)
        counts[0] += n

    async def guarded(i: int) -> None:
        account = f"{args.prefix}{i}"
        try:
            if args.batch > 1:
                await many(avatars[i], account)
            else:
                await single(avatars[i], account)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}"[:300])

    await gatherResults([ensureDeferred(guarded(i)) for i in range(len(avatars))])
    elapsed = clock() - start
    used = cpu() - cpu_start
    for factory in factories:
        factory.disconnect()
    print(json.dumps({
        "count": counts[0], "calls": len(latencies), "seconds": elapsed, "cpu_seconds": used,
        "latencies_us": latencies, "errors": errors,
    }), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="1: execute; more: execute_many")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--prefix", default="acct", help="account name prefix")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
