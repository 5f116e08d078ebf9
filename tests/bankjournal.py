"""
Helpers shared by the tool, corruption and crash-point tests: write a bank
journal through the real :class:`JournalService` (synchronously: a
synchronous runner and ``task.Clock``, so no threads and no reactor), and
remember the live model after every command, which is what any recovery
must reproduce for some prefix of the commands.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from examples.bank import Bank, Deposit, OpenAccount, Transfer, Withdraw, bank
from txjournal import JournalService
from txjournal import record as rec

#: Logged times start here (seconds since the epoch) and advance 1.5 s per command.
START_TIME = 1_700_000_000.0

ACCOUNTS = ("alice", "bob", "carol", "dave")


def sync_runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


def command_mix(count: int, seed: int = 1) -> list[object]:
    """
    A deterministic mix of bank commands, some of which are rejected
    (overdrafts, unknown accounts, reopening): rejections are part of
    history too and must replay the same way.
    """
    rng = random.Random(seed)
    commands: list[object] = []
    for _ in range(count):
        kind = rng.random()
        a, b = rng.sample(ACCOUNTS, 2)
        if kind < 0.45:
            commands.append(Deposit(a, rng.randint(1, 50)))
        elif kind < 0.7:
            commands.append(Withdraw(a, rng.randint(1, 60)))
        elif kind < 0.9:
            commands.append(Transfer(a, b, rng.randint(1, 40)))
        else:
            commands.append(OpenAccount(a))
    return commands


def start_bank(datadir: Path | str, runner: Any = sync_runner, clock: Clock | None = None,
               **kw: Any) -> JournalService[Bank]:
    """
    A started service on ``datadir`` that never touches threads or the real
    reactor. The recovery tests start thousands in one process: without
    ``tune_gc``, each restart would pay a full collection of the test
    process's heap (the tuning has tests of its own).
    """
    kw.setdefault("snapshot_on_stop", False)
    kw.setdefault("tune_gc", False)
    svc: JournalService[Bank] = JournalService(
        bank, str(datadir), runner=runner, reactor=clock or Clock(), **kw
    )
    svc.startService()
    return svc


def stop(svc: JournalService[Any]) -> None:
    d = svc.stopService()
    assert d.called, "stopService must finish synchronously with a synchronous runner"


@dataclass
class Built:
    """A data directory written by the service, and the models along the way."""

    datadir: Path
    commands: list[object]
    #: ``models[k]``: the live model after the first ``k`` commands.
    models: list[Bank]
    segment_size: int
    snapshots: list[int] = field(default_factory=list)

    def segment_paths(self) -> list[Path]:
        return sorted((self.datadir / "journal").glob("*.log"))

    def snapshot_paths(self) -> list[Path]:
        return sorted((self.datadir / "snapshots").glob("*.snapshot"))


def build_bank(
    datadir: Path,
    commands: list[object],
    segment_size: int = 400,
    snapshot_after: Iterable[int] = (),
) -> Built:
    """
    Execute ``commands`` one by one through a service (each its own batch),
    taking a snapshot after the commands numbered in ``snapshot_after``.
    """
    clock = Clock()
    clock.advance(START_TIME)
    svc = start_bank(datadir, clock=clock, segment_size=segment_size)
    models = [Bank()]
    wanted = set(snapshot_after)
    taken = []
    for i, command in enumerate(commands, 1):
        clock.advance(1.5)
        d = svc.execute(command)
        assert d.called
        d.addErrback(lambda _f: None)  # a rejected command: part of history
        models.append(copy.deepcopy(svc.model))
        if i in wanted:
            taken.append(_result(svc.snapshot()))
    stop(svc)
    return Built(datadir, list(commands), models, segment_size, taken)


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def files_of(datadir: Path) -> dict[str, bytes]:
    """Every file under ``datadir`` (relative path -> bytes), except ``LOCK``."""
    out = {}
    for root, _dirs, names in os.walk(datadir):
        for name in names:
            path = Path(root) / name
            rel = str(path.relative_to(datadir))
            if rel != "LOCK":
                out[rel] = path.read_bytes()
    return out


def materialize(files: dict[str, bytes], dest: Path) -> None:
    """Make ``dest`` hold exactly ``files`` (dirs mode 0700, as the service wants)."""
    if dest.exists():
        shutil.rmtree(dest)
    for sub in ("", "journal", "snapshots"):
        (dest / sub).mkdir(mode=0o700, exist_ok=True)
    for rel, data in files.items():
        path = dest / rel
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(data)


@dataclass(frozen=True)
class Located:
    """Where a record sits: file, offset, end offset."""

    seq: int
    name: str
    path: Path
    offset: int
    end: int


def locate_records(built: Built) -> list[Located]:
    """Every record of the journal with its file and byte range."""
    out = []
    for path in built.segment_paths():
        data = path.read_bytes()
        salt = rec.decode_segment_header(data).salt_bytes
        for offset, record in rec.iter_records(data, rec.SEGMENT_HEADER_SIZE, salt):
            _r, end = rec.decode_at(data, offset, salt)
            out.append(Located(record.seq, record.name, path, offset, end))
    return out
