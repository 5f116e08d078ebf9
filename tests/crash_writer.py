"""
A journal writer for the crash tests; run it as a subprocess and SIGKILL it.

    python tests/crash_writer.py DATADIR [--callers K] [--seed S] ...

It starts a :class:`JournalService` with the bank schema on DATADIR and runs
K concurrent callers, each looping over random (seeded) deposits and
transfers, some of which the bank rejects. Every line on stdout is one JSON
object, written with a single ``os.write`` (atomic on a pipe):

- ``{"event": "ready", "pid": ..., "next_seq": ..., "replayed": ...}`` once
  start-up replay is done;
- ``{"event": "ack", "seq": ..., "cmd": ..., "fields": {...}, "ok": true,
  "result": ...}`` (or ``"ok": false, "error": "InsufficientFunds"``) after
  each command's Deferred has fired, i.e. after it is durable and applied;
- ``{"event": "error", "type": ..., "message": ...}`` if start-up fails
  (exit status 2), e.g. with ``DataDirLocked``;
- ``{"event": "fatal", ...}`` if the journal itself fails (exit status 3).

With ``--callers 0`` it only holds the data directory. ``--max-seconds`` is
a safety net: the writer stops by itself if nobody kills it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from examples.bank import Deposit, Transfer, bank  # noqa: E402
from txjournal import JournalService, TxJournalError  # noqa: E402

ACCOUNTS = [f"acct{i}" for i in range(6)]


def emit(obj: dict[str, Any]) -> None:
    os.write(1, (json.dumps(obj, sort_keys=True) + "\n").encode())


def pick(rng: random.Random) -> Any:
    """A random command: mostly valid, some that the bank rejects."""
    roll = rng.random()
    if roll < 0.4:
        return Deposit(rng.choice(ACCOUNTS), rng.randint(1, 100))
    if roll < 0.45:
        return Deposit(rng.choice(ACCOUNTS), 0)  # ValueError
    if roll < 0.5:
        return Transfer(rng.choice(ACCOUNTS), "nobody", 5)  # UnknownAccount
    source, target = rng.sample(ACCOUNTS, 2)
    return Transfer(source, target, rng.randint(1, 250))  # may be InsufficientFunds


async def caller(service: JournalService[Any], rng: random.Random, state: dict[str, bool]) -> None:
    while not state["stop"]:
        command = pick(rng)
        engine = service.engine
        before = engine.last_seq
        d = service.execute(command)
        seq = engine.last_seq
        line: dict[str, Any] = {
            "event": "ack",
            "seq": seq,
            "cmd": bank.type_of(command).name,
            "fields": dataclasses.asdict(command),
        }
        try:
            result = await d
        except TxJournalError as e:
            emit({"event": "fatal", "type": type(e).__name__, "message": str(e)})
            os._exit(3)
        except Exception as e:
            line["ok"] = False
            line["error"] = type(e).__name__
        else:
            line["ok"] = True
            line["result"] = result
        if seq == before:
            emit({"event": "fatal", "type": "NoSeq", "message": f"{command!r} got no seq"})
            os._exit(3)
        emit(line)


async def run(reactor: Any, service: JournalService[Any], args: argparse.Namespace) -> None:
    state = {"stop": False}
    emit({
        "event": "ready",
        "pid": os.getpid(),
        "next_seq": service.engine.last_seq + 1,
        "replayed": service.replayed,
        "snapshot": service.loaded_snapshot_seq,
    })
    done: Deferred[None] = Deferred()
    reactor.callLater(args.max_seconds, done.callback, None)
    callers = [
        ensureDeferred(caller(service, random.Random(f"{args.seed}:{i}"), state))
        for i in range(args.callers)
    ]
    await done
    state["stop"] = True
    await gatherResults(callers)
    await service.stopService()
    emit({"event": "stopped"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("datadir")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--segment-size", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--snapshot-interval", type=float, default=0.0)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    service: JournalService[Any] = JournalService(
        bank,
        args.datadir,
        snapshot_interval=args.snapshot_interval or None,
        snapshot_on_stop=False,
        segment_size=args.segment_size,
    )
    try:
        service.startService()
    except TxJournalError as e:
        emit({"event": "error", "type": type(e).__name__, "message": str(e)})
        sys.exit(2)
    react(lambda reactor: ensureDeferred(run(reactor, service, args)))


if __name__ == "__main__":
    main()
