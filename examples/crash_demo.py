"""
Kill -9 a real ``twistd journal`` under load and prove nothing acknowledged
is lost and nothing is invented.

Usage (from the repository root)::

    .venv/bin/python examples/crash_demo.py [--rounds 4] [--clients 20] [--workdir DIR]

Each round starts ``twistd -n journal --app examples.bank:bank`` on the same
data directory, runs ``--clients`` concurrent PB clients doing random
transfers between accounts, SIGKILLs the server after a random number of
acknowledged commands, and then checks, against the journal on disk:

* every acknowledged command (a result, or the command's own exception:
  both mean it is durable) is in the journal;
* every journal record is a command some client sent (nothing invented);
* sequence numbers are dense;
* after a restart, the served model equals the journal replayed from
  scratch, and the total amount of money is what the deposits put in.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
from collections import Counter
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.spread import pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.bank import Bank, bank  # noqa: E402
from txjournal.journal.file import FileJournal  # noqa: E402
from txjournal.schema import Context  # noqa: E402
from txjournal.users import add_user  # noqa: E402

ACCOUNTS = [f"acct{i:02d}" for i in range(20)]
INITIAL = 1000
PASSWORD = "crash-demo-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server(protocol.ProcessProtocol):
    """A ``twistd -n journal`` child whose log lines we can wait for."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._buffer = b""
        self._waiting: list[tuple[str, defer.Deferred[str]]] = []
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for item in list(self._waiting):
                if item[0] in line:
                    self._waiting.remove(item)
                    item[1].callback(line)

    errReceived = outReceived

    def wait_for(self, text: str) -> defer.Deferred[str]:
        for line in self.lines:
            if text in line:
                return defer.succeed(line)
        d: defer.Deferred[str] = defer.Deferred()
        self._waiting.append((text, d))
        return d

    def processEnded(self, reason: Any) -> None:
        for _text, d in self._waiting:
            d.errback(RuntimeError("server exited:\n" + "\n".join(self.lines[-30:])))
        self._waiting = []
        self.ended.callback(reason.value)


def spawn_twistd(
    reactor: Any, workdir: str, port: int, extra: list[str], name: str = "bank"
) -> Server:
    """Start ``twistd -n journal`` serving the bank from ``workdir/name`` (not waiting for it)."""
    server = Server()
    args = [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile", "", "--logfile", "-",
        "journal", "--app", "examples.bank:bank",
        "--datadir", os.path.join(workdir, name),
        "--users", os.path.join(workdir, "users"),
        "--pb", f"tcp:{port}:interface=127.0.0.1",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reactor.spawnProcess(server, sys.executable, args, env=env, path=ROOT)
    return server


async def start_server(
    reactor: Any, workdir: str, port: int, journal_url: str | None = None
) -> Server:
    extra = ["--snapshot-interval", "0.5"] + (["--journal", journal_url] if journal_url else [])
    server = spawn_twistd(reactor, workdir, port, extra)
    await server.wait_for("ready:")
    return server


async def login(reactor: Any, port: int) -> tuple[pb.PBClientFactory, Any]:
    factory = pb.PBClientFactory()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    avatar = await factory.login(UsernamePassword(b"demo", PASSWORD.encode()))
    return factory, avatar


def key(name: str, fields: dict[str, Any]) -> str:
    return json.dumps([name, fields], sort_keys=True)


class Ledger:
    """What clients sent and what the server acknowledged, as multisets."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.acked: Counter[str] = Counter()
        self.acks = 0
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []

    def ack(self, k: str) -> None:
        self.acked[k] += 1
        self.acks += 1
        for item in [w for w in self._waiters if w[0] <= self.acks]:
            self._waiters.remove(item)
            item[1].callback(None)

    def when_acks(self, n: int) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.acks >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return d


async def client_loop(
    avatar: Any, rng: random.Random, ledger: Ledger, stop: list[bool]
) -> None:
    while not stop[0]:
        source, target = rng.sample(ACCOUNTS, 2)
        fields = {"source": source, "target": target, "amount": rng.randint(1, 300)}
        k = key("transfer", fields)
        ledger.sent[k] += 1
        try:
            await avatar.callRemote("execute", "transfer", fields)
        except pb.RemoteError as e:
            # The command ran and raised (an overdraft): durable all the same.
            if b"RemoteCommandError" not in (e.remoteType or b""):
                return
        except Exception:
            return  # connection lost: outcome unknown, not acknowledged
        ledger.ack(k)


def read_journal(datadir: str, journal_url: str | None = None) -> list[Any]:
    if journal_url:
        from txjournal.replica import ReplicaJournal

        sql = ReplicaJournal(journal_url)  # read-only: never takes over
        sql.open()
        try:
            return list(sql.replay(1))
        finally:
            sql.close()
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    return list(journal.replay())


def replay_model(records: list[Any]) -> Bank:
    model = bank.new_model()
    for r in records:
        command = bank.decode(r.name, r.version, r.fields)
        try:
            command.execute(model, Context(r.seq, r.time_ns, 0, r.user))  # type: ignore[attr-defined]
        except Exception:
            pass
    return model


async def run(
    reactor: Any,
    workdir: str,
    rounds: int = 4,
    clients: int = 20,
    seed: int = 1,
    journal_url: str | None = None,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    users = os.path.join(workdir, "users")
    if not os.path.exists(users):
        add_user(users, "demo", "rw", PASSWORD)
    datadir = os.path.join(workdir, "bank")
    ledger = Ledger()
    report = []
    for round_no in range(rounds):
        port = free_port()
        server = await start_server(reactor, workdir, port, journal_url)
        sessions = [await login(reactor, port) for _ in range(clients)]
        if round_no == 0:
            for account in ACCOUNTS:
                fields = {"account": account, "amount": INITIAL}
                ledger.sent[key("deposit", fields)] += 1
                await sessions[0][1].callRemote("execute", "deposit", fields)
                ledger.ack(key("deposit", fields))
        kill_after = ledger.acks + rng.choice([1, 5, 50, 200, 600, 1500])
        stop = [False]
        loops = [
            defer.ensureDeferred(client_loop(avatar, random.Random(rng.random()), ledger, stop))
            for _f, avatar in sessions
        ]
        all_stopped: defer.Deferred[Any] = defer.DeferredList(loops)
        reached: defer.Deferred[Any] = ledger.when_acks(kill_after)
        await defer.DeferredList([reached, all_stopped], fireOnOneCallback=True)
        if ledger.acks < kill_after:
            raise RuntimeError("every client stopped before the kill point")
        assert server.transport is not None
        os.kill(server.transport.pid, signal.SIGKILL)
        await server.ended
        stop[0] = True
        await defer.DeferredList(loops)
        for factory, _avatar in sessions:
            factory.disconnect()

        records = read_journal(datadir, journal_url)
        seqs = [r.seq for r in records]
        assert seqs == list(range(1, len(records) + 1)), "sequence numbers are not dense"
        present = Counter(key(r.name, bank.decode(r.name, r.version, r.fields).__dict__) for r in records)
        lost = ledger.acked - present
        invented = present - ledger.sent
        assert not lost, f"acknowledged commands missing after kill: {list(lost)[:5]}"
        assert not invented, f"journal holds commands nobody sent: {list(invented)[:5]}"

        port = free_port()
        server = await start_server(reactor, workdir, port, journal_url)
        factory, avatar = await login(reactor, port)
        served = await avatar.callRemote("query", "accounts", {})
        total = await avatar.callRemote("query", "total", {})
        factory.disconnect()
        assert server.transport is not None
        server.transport.signalProcess("TERM")
        await server.ended
        expected = replay_model(records).accounts
        assert served == expected, "served model differs from the journal replayed"
        assert total == INITIAL * len(ACCOUNTS), f"money not conserved: {total}"
        report.append({
            "round": round_no,
            "acknowledged_total": sum(ledger.acked.values()),
            "journal_records": len(records),
            "sent_total": sum(ledger.sent.values()),
            "killed_after_acks": ledger.acks,
        })
    return report


def main() -> None:
    from twisted.internet import task

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--journal", default=None, help="a journal URL (postgresql://...) instead of files")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="txjournal-crash-")

    async def go(reactor: Any) -> None:
        report = await run(reactor, workdir, args.rounds, args.clients, args.seed, args.journal)
        for row in report:
            print(json.dumps(row))
        print(f"OK: {len(report)} kill -9 rounds, nothing acknowledged lost, nothing invented ({workdir})")

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
