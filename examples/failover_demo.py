"""
Fail over a PostgreSQL-journalled ``twistd journal`` under load, twice, and
prove no acknowledged command is lost or duplicated.

Usage (from the repository root; needs PostgreSQL)::

    .venv/bin/python examples/failover_demo.py --journal postgresql://postgres@127.0.0.1/DB

Round 1, automatic: a writer (``twistd journal --journal URL``) and a
replica (``--replica-of URL --auto-promote``) run; 20 PB clients do random
transfers on the writer; the writer is killed with SIGKILL; the replica
promotes itself (the writer's lease went with its database session) and
the clients carry on against it.

Round 2, a hung writer: the (promoted) writer is frozen with SIGSTOP, so
its session stays open and it still holds the lease; a second replica is
promoted by an admin over PB with ``take_over`` (it fences the frozen
writer and ends its session); the frozen writer is then thawed with
SIGCONT: its next batch must fail and nothing it tries to write may land.

After each round, against the journal in the database: every acknowledged
command is there, nothing is there that no client sent, sequence numbers
are dense, the new writer's model equals the journal replayed, and the
money is conserved. Finally the old writer, restarted without
``--take-over``, must refuse to start while the new writer lives.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from twisted.internet import defer
from twisted.spread import pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.bank import bank  # noqa: E402
from examples.crash_demo import (  # noqa: E402
    ACCOUNTS,
    INITIAL,
    PASSWORD,
    Ledger,
    Server,
    client_loop,
    free_port,
    key,
    login,
    read_journal,
    replay_model,
    spawn_twistd,
)
from txjournal.users import add_user  # noqa: E402

ADMIN_PASSWORD = "failover-demo-admin"


async def start_twistd(reactor: Any, workdir: str, name: str, port: int, extra: list[str]) -> Server:
    server = spawn_twistd(reactor, workdir, port, ["--snapshot-interval", "0.5", *extra], name=name)
    await server.wait_for("ready:")
    return server


async def admin_login(reactor: Any, port: int) -> tuple[pb.PBClientFactory, Any]:
    from twisted.cred.credentials import UsernamePassword
    from twisted.internet.endpoints import TCP4ClientEndpoint

    factory = pb.PBClientFactory()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    avatar = await factory.login(UsernamePassword(b"ops", ADMIN_PASSWORD.encode()))
    return factory, avatar


async def load(reactor: Any, port: int, clients: int, rng: random.Random, ledger: Ledger, acks: int) -> tuple[list[Any], Any, list[bool]]:
    """Start ``clients`` transfer loops on ``port``; return once ``acks`` more are acknowledged."""
    sessions = [await login(reactor, port) for _ in range(clients)]
    stop = [False]
    loops = [
        defer.ensureDeferred(client_loop(avatar, random.Random(rng.random()), ledger, stop))
        for _f, avatar in sessions
    ]
    all_stopped: defer.Deferred[Any] = defer.DeferredList(loops)
    await defer.DeferredList([ledger.when_acks(ledger.acks + acks), all_stopped], fireOnOneCallback=True)
    return sessions, defer.DeferredList(loops), stop


def check(journal_url: str, ledger: Ledger) -> list[Any]:
    records = read_journal("", journal_url)
    seqs = [r.seq for r in records]
    assert seqs == list(range(1, len(records) + 1)), "sequence numbers are not dense"
    present = Counter(key(r.name, bank.decode(r.name, r.version, r.fields).__dict__) for r in records)
    lost = ledger.acked - present
    invented = present - ledger.sent
    assert not lost, f"acknowledged commands missing after failover: {list(lost)[:5]}"
    assert not invented, f"journal holds commands nobody sent: {list(invented)[:5]}"
    return records


async def served_matches(reactor: Any, port: int, records: list[Any]) -> None:
    factory, avatar = await login(reactor, port)
    try:
        served = await avatar.callRemote("query", "accounts", {})
        total = await avatar.callRemote("query", "total", {})
    finally:
        factory.disconnect()
    assert served == replay_model(records).accounts, "served model differs from the journal replayed"
    assert total == INITIAL * len(ACCOUNTS), f"money not conserved: {total}"


async def run(reactor: Any, workdir: str, journal_url: str, clients: int = 20, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    users = os.path.join(workdir, "users")
    add_user(users, "demo", "rw", PASSWORD)
    add_user(users, "ops", "admin", ADMIN_PASSWORD)
    common = ["--snapshots", journal_url]
    replica_args = [*common, "--replica-of", journal_url, "--poll-interval", "0.2"]
    ledger = Ledger()
    report: dict[str, Any] = {}

    # -- round 1: SIGKILL of the writer, automatic promotion ------------------
    writer_port, replica_port = free_port(), free_port()
    writer = await start_twistd(reactor, workdir, "writer", writer_port, ["--journal", journal_url, *common])
    replica = await start_twistd(
        reactor, workdir, "replica1", replica_port,
        [*replica_args, "--auto-promote", "--promote-grace", "0.3"],
    )
    factory, avatar = await login(reactor, writer_port)
    for account in ACCOUNTS:
        fields = {"account": account, "amount": INITIAL}
        ledger.sent[key("deposit", fields)] += 1
        await avatar.callRemote("execute", "deposit", fields)
        ledger.ack(key("deposit", fields))
    factory.disconnect()
    sessions, loops, stop = await load(reactor, writer_port, clients, rng, ledger, rng.choice([300, 800, 1500]))
    acked_before = ledger.acks
    assert writer.transport is not None
    killed = time.monotonic()
    os.kill(writer.transport.pid, signal.SIGKILL)
    await writer.ended
    stop[0] = True
    await loops
    for f, _a in sessions:
        f.disconnect()
    line = await replica.wait_for("Promoted:")
    promoted_after = time.monotonic() - killed
    took = float(line.rsplit("took ", 1)[1].rstrip("s"))
    records = check(journal_url, ledger)
    report["round1"] = {
        "acknowledged_before_kill": acked_before,
        "acknowledged_total": ledger.acks,
        "journal_records_after_promotion": len(records),
        "seconds_from_kill_to_promoted": round(promoted_after, 3),
        "seconds_promotion_itself": took,
    }

    # -- round 2: a hung writer, promotion with take-over over PB --------------
    second_port = free_port()
    second = await start_twistd(reactor, workdir, "replica2", second_port, replica_args)
    sessions, loops, stop = await load(reactor, replica_port, clients, rng, ledger, rng.choice([300, 800]))
    acked_before = ledger.acks
    assert replica.transport is not None
    os.kill(replica.transport.pid, signal.SIGSTOP)  # hung: its session and lease live on
    stopped = time.monotonic()
    ops_factory, ops = await admin_login(reactor, second_port)
    status = await ops.callRemote("promote", True)
    promoted_after = time.monotonic() - stopped
    ops_factory.disconnect()
    assert status["role"] == "writer", status
    os.kill(replica.transport.pid, signal.SIGCONT)  # the stale writer wakes up...
    stop[0] = True
    await loops  # ...and its clients' pending commands fail: none acknowledged after the fence
    for f, _a in sessions:
        f.disconnect()
    records = check(journal_url, ledger)
    acked_on_stale = ledger.acks
    # The stale writer can no longer write anything.
    factory, avatar = await login(reactor, replica_port)
    try:
        await avatar.callRemote("execute", "deposit", {"account": "stale", "amount": 1})
        raise AssertionError("the fenced writer acknowledged a command")
    except pb.RemoteError as e:
        refused = (e.remoteType or b"").decode()
    finally:
        factory.disconnect()
    assert ledger.acks == acked_on_stale
    records = check(journal_url, ledger)
    assert "stale" not in replay_model(records).accounts
    await served_matches(reactor, second_port, records)
    report["round2"] = {
        "acknowledged_before_freeze": acked_before,
        "acknowledged_total": ledger.acks,
        "journal_records_after_promotion": len(records),
        "seconds_to_promote_with_take_over": round(promoted_after, 3),
        "stale_writer_refused_with": refused,
    }

    # -- the old writer may not come back while the new one lives ---------------
    assert replica.transport is not None
    replica.transport.signalProcess("KILL")
    await replica.ended
    comeback = spawn_twistd(reactor, workdir, free_port(), ["--journal", journal_url, *common], name="writer")
    await comeback.ended
    text = "\n".join(comeback.lines)
    assert "another writer holds the lease" in text, text[-2000:]
    assert len(check(journal_url, ledger)) == len(records)
    report["old_writer_restart"] = "refused: another writer holds the lease"

    assert second.transport is not None
    second.transport.signalProcess("TERM")
    await second.ended
    return report


def main() -> None:
    from twisted.internet import task

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--journal", required=True, help="a postgresql:// URL of an empty database")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="txjournal-failover-")

    async def go(reactor: Any) -> None:
        report = await run(reactor, workdir, args.journal, args.clients, args.seed)
        print(json.dumps(report, indent=2))
        print(f"OK: two failovers under load, nothing acknowledged lost, nothing invented ({workdir})")

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
