"""
Snapshots written by a fresh process that replays the journal, so the
reactor pauses only to start a process (1-4 ms here), whatever the size
of the model.

A forked snapshot (:mod:`txjournal.snapshot.fork`) stalls the reactor for
the ``fork()``: the kernel copies the page tables of the whole process,
about 20-25 ms per GiB of process on a small virtual machine, and with
:mod:`gc`-tracked objects spread over the heap nothing makes that cheaper.
Here the service instead starts a new Python process (``posix_spawn``, no
page tables copied) that imports the application by name, loads the newest
snapshot, replays the journal up to the sequence number the service asked
for, and writes that snapshot, as a restart would rebuild the model. The
reactor only starts the process and reads its one-line report.

The price: the child needs the application importable by name
(``package.module:schema``, as ``twistd journal --app`` has it), CPU and
time to load the previous snapshot and replay the records since, and
memory for a second model while it runs (a forked child copies as much
as it pickles anyway). The child runs the code on disk: like a restart, it
replays with whatever the application's modules hold now.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from txjournal.errors import SnapshotError

#: How much of the child's standard error a failure report keeps.
_MAX_ERROR = 4096


class _Report(ProcessProtocol):
    """Collects the child's report (stdout) and errors (stderr)."""

    def __init__(self, seq: int, reactor: Any = None) -> None:
        self.seq = seq
        self.reactor = reactor
        self._closed: set[int] = set()
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: Deferred[tuple[str, int]] = Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        if sum(map(len, self.err)) < _MAX_ERROR:
            self.err.append(data)

    def childConnectionLost(self, childFD: int) -> None:
        # Twisted learns that a child exited from SIGCHLD, which a reactor run
        # with installSignalHandlers=False never handles: once the child has
        # closed its output, look for its exit status until it is there.
        self._closed.add(childFD)
        if {1, 2} <= self._closed and self.reactor is not None:
            self._reap()

    def _reap(self) -> None:
        if self.done.called:
            return
        self.transport.reapProcess()  # type: ignore[union-attr]
        if not self.done.called:
            self.reactor.callLater(0.05, self._reap)

    def processEnded(self, reason: Failure) -> None:
        try:
            result = self._result(reason)
        except SnapshotError as e:
            self.done.errback(e)
        else:
            self.done.callback(result)

    def _result(self, reason: Failure) -> tuple[str, int]:
        errors = b"".join(self.err).decode("utf-8", "replace").strip()
        lines = errors.splitlines()
        why = lines[-1] if lines else "no error output"
        if not reason.check(ProcessDone):
            value: Any = reason.value
            signal = getattr(value, "signal", None)
            if signal is not None:
                raise SnapshotError(
                    f"the snapshot process {self.pid} was killed by signal {signal}"
                )
            raise SnapshotError(
                f"the snapshot process {self.pid} failed (exit status "
                f"{getattr(value, 'exitCode', '?')}): {why}"
            )
        try:
            report = json.loads(b"".join(self.out))
            return str(report["path"]), int(report["size"])
        except (ValueError, KeyError, TypeError):
            raise SnapshotError(
                f"the snapshot process {self.pid} exited without a report: {why}"
            ) from None


def spawn(reactor: Any, app: str, schema_name: str, datadir: str, seq: int) -> _Report:
    """
    Start the child that writes snapshot ``seq`` of ``datadir``; its
    :attr:`_Report.done` fires with (path, payload size) or fails with
    :class:`~txjournal.errors.SnapshotError`.
    """
    report = _Report(seq, reactor)
    env = dict(os.environ)
    # The parent's import path, so the child finds the application where
    # the parent did (twistd and python -m set it up differently).
    env["TXJOURNAL_SYS_PATH"] = json.dumps([p or os.getcwd() for p in sys.path])
    args = [
        sys.executable, "-m", "txjournal.snapshot.replayed",
        "--app", app, "--schema-name", schema_name, "--seq", str(seq),
        "--parent", str(os.getpid()), datadir,
    ]
    reactor.spawnProcess(report, sys.executable, args, env=env, path=os.getcwd())
    return report


def write(app: str, schema_name: str, datadir: str, seq: int) -> tuple[str, int]:
    """The child's work: rebuild the model as of ``seq`` and save it."""
    from txjournal.history import replay_to
    from txjournal.snapshot.file import FileSnapshotStore
    from txjournal.snapshot.serializer import PickleSerializer
    from txjournal.tap import load_schema

    schema = load_schema(app)
    if schema.name != schema_name:
        raise SnapshotError(
            f"{app} is schema {schema.name!r}, but the service runs {schema_name!r}"
        )
    point = replay_to(schema, datadir, until_seq=seq)
    if point.seq != seq:
        raise SnapshotError(
            f"the journal in {datadir} ends at {point.seq}, before the snapshot's {seq}"
        )
    serializer = PickleSerializer()
    payload = serializer.dumps(point.model)
    digest = schema.model_digest(point.model, payload)
    path = FileSnapshotStore(os.path.join(datadir, "snapshots")).save(seq, payload, digest)
    return path, len(payload)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - runs in the child
    parser = argparse.ArgumentParser(prog="python -m txjournal.snapshot.replayed")
    parser.add_argument("--app", required=True)
    parser.add_argument("--schema-name", required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("datadir")
    args = parser.parse_args(argv)
    from txjournal.snapshot.fork import die_with_parent

    die_with_parent(args.parent)
    try:
        os.nice(10)  # background work: the service's reactor wins the CPU
    except OSError:
        pass
    path = os.environ.get("TXJOURNAL_SYS_PATH")
    if path:
        sys.path[:] = json.loads(path)
    os.umask(0o077)
    try:
        saved, size = write(args.app, args.schema_name, args.datadir, args.seq)
    except BaseException as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps({"path": saved, "size": size}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover - runs in the child
    sys.exit(main())
