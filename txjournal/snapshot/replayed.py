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
import signal
import sys
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from txjournal.errors import SnapshotError

#: How much of the child's standard error (and report) is kept.
_MAX_ERROR = 4096

#: The descriptor the child writes its report on: its stdout belongs to the
#: application, whose prints must not be taken for a report.
REPORT_FD = 3

#: Run by the child. First of all, out of the terminal's reach: a Ctrl-C
#: meant for the service must not end its snapshot half-way (the service
#: decides when the process ends). Then the parent's import path (so that
#: txjournal and the application are found where the parent found them),
#: then :func:`main`.
_BOOTSTRAP = """\
import os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    os.setsid()
except OSError:
    pass
import json, sys
sys.path[:] = json.loads(os.environ['TXJOURNAL_SYS_PATH'])
from txjournal.snapshot.replayed import main
main()
"""

#: Why stopService ends a snapshot process (a quiet end, not a failure).
STOPPING = "the service is stopping"

#: How much of the report is kept (its error text is cut to far less).
_MAX_REPORT = 1 << 20

#: Fingerprints of loaded modules, taken the first time each is seen: the
#: code on disk may change later, the code running does not.
_SEEN: dict[tuple[str, int], bytes] = {}

#: Seconds to keep reading the report and errors after the process exited:
#: a process the application started may hold the pipes open for ever.
DRAIN = 1.0


class ProcessFailed(SnapshotError):
    """
    The snapshot process ran and exited with an error of its own. ``stage``
    says where: ``"load"`` (it could not import the application, or not the
    same code as the service's, or a snapshot it needed was damaged and the
    journal pruned: the service may write this snapshot from its live model
    instead) or ``"save"`` (writing the file failed: so would any other way).
    """

    def __init__(self, message: str, stage: str = "load") -> None:
        super().__init__(message)
        self.stage = stage


class _SaveFailed(SnapshotError):
    """In the process: writing the snapshot file failed."""


def code_fingerprint(app: str, schema: Any) -> str:
    """
    A digest of the source files that decide what replay does: the module
    ``app`` names and those defining the schema's model factory, commands
    and upgrade functions. The snapshot process compares its own with the
    service's, so that code changed on disk since the service imported it is
    never replayed into a snapshot (a restart with that code would, and is
    the place for it). Each module's file is read the first time this
    process fingerprints it and remembered, as the code in memory stays
    what it was.
    """
    import hashlib

    names = {app.partition(":")[0]}
    functions = [schema.model_factory]
    for ctype in schema.commands.values():
        names.add(ctype.cls.__module__)
        functions.extend(ctype.upgrade.values())
    for f in functions:
        f = getattr(f, "func", f)  # functools.partial
        names.add(getattr(f, "__module__", None) or "")
    digest = hashlib.sha256()
    for name in sorted(n for n in names if n):
        digest.update(name.encode() + b"\0" + _module_digest(name) + b"\0")
    return digest.hexdigest()


def _module_digest(name: str) -> bytes:
    import hashlib

    module = sys.modules.get(name)
    if module is None:
        return b"not imported"
    key = (name, id(module))
    known = _SEEN.get(key)
    if known is None:
        path = getattr(module, "__file__", None)
        if not path:
            known = b"no file"
        else:
            try:
                loader = getattr(module, "__loader__", None)
                get_data = getattr(loader, "get_data", None)
                if get_data is not None:  # zipimport and friends too
                    data = get_data(path)
                else:
                    with open(path, "rb") as f:
                        data = f.read()
                known = hashlib.sha256(data).digest()
            except OSError:
                known = b"unreadable " + path.encode()
        _SEEN[key] = known
    return known


def _tail(chunks: list[bytes], data: bytes) -> None:
    """Keep the last _MAX_ERROR bytes: the error comes last, after any chatter."""
    chunks.append(data)
    while len(chunks) > 1 and sum(map(len, chunks)) - len(chunks[0]) >= _MAX_ERROR:
        del chunks[0]


class _Report(ProcessProtocol):
    """Collects the child's report (fd 3) and errors (stderr)."""

    def __init__(self, seq: int, reactor: Any = None) -> None:
        self.seq = seq
        self.reactor = reactor
        self._closed: set[int] = set()
        self.report: list[bytes] = []
        self.err: list[bytes] = []
        self.done: Deferred[Written] = Deferred()
        self.pid: int | None = None
        #: Why the service killed the process, if it did.
        self.killed_because: str | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == REPORT_FD:
            if sum(map(len, self.report)) < _MAX_REPORT:
                self.report.append(data)
        elif childFD == 2:
            _tail(self.err, data)

    def kill(self, because: str) -> None:
        """End the process and its group now (SIGKILL); its snapshot fails saying ``because``."""
        if self.done.called or self.killed_because is not None:
            return
        self.killed_because = because
        pid = self.transport.pid  # type: ignore[union-attr]
        if pid is None:
            return  # exited already; the drain ends it
        try:
            # Its own group (setsid), so what the application started goes too.
            # Not reaped yet, so the group cannot be someone else's.
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass  # not its own group yet
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass

    def processExited(self, reason: Failure) -> None:
        if self.reactor is not None and not self.done.called:
            self.reactor.callLater(DRAIN, self._stop_reading)

    def _stop_reading(self) -> None:
        if not self.done.called:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def childConnectionLost(self, childFD: int) -> None:
        # Twisted learns that a child exited from SIGCHLD, which a reactor run
        # with installSignalHandlers=False never handles: once the child has
        # closed its output, look for its exit status until it is there.
        self._closed.add(childFD)
        if {2, REPORT_FD} <= self._closed and self.reactor is not None:
            self._reap()

    def _reap(self) -> None:
        if self.done.called or self.transport.pid is None:  # type: ignore[union-attr]
            return  # reaped: processEnded follows
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

    def _result(self, reason: Failure) -> Written:
        errors = b"".join(self.err).decode("utf-8", "replace").strip()
        lines = errors.splitlines()
        why = lines[-1] if lines else "no error output"
        try:
            report = json.loads(b"".join(self.report))
            if not isinstance(report, dict):
                report = {}
        except ValueError:
            report = {}
        if not reason.check(ProcessDone) and "path" in report and "error" not in report:
            # Killed after it had written the snapshot and said so (a stop,
            # a timeout at the last moment): the snapshot is complete.
            reason = Failure(ProcessDone(0))
        if not reason.check(ProcessDone):
            value: Any = reason.value
            signal = getattr(value, "signal", None)
            if self.killed_because is not None:
                raise SnapshotError(
                    f"the snapshot process {self.pid} was killed: {self.killed_because}"
                )
            if signal is not None:
                raise SnapshotError(
                    f"the snapshot process {self.pid} was killed by signal {signal}"
                )
            raise ProcessFailed(
                f"the snapshot process {self.pid} failed (exit status "
                f"{getattr(value, 'exitCode', '?')}): {report.get('error') or why}",
                "save" if report.get("stage") == "save" else "load",
            )
        try:
            skipped = [(int(seq), str(reason)) for seq, reason in report.get("skipped", [])]
            return Written(str(report["path"]), int(report["size"]), skipped)
        except (ValueError, KeyError, TypeError):
            raise SnapshotError(
                f"the snapshot process {self.pid} exited without a report: {why}"
            ) from None


class Written(NamedTuple):
    """What a snapshot process wrote, and the snapshots it could not load."""

    path: str
    size: int
    skipped: list[tuple[int, str]]


def spawn(
    reactor: Any, app: str, schema_name: str, datadir: str, seq: int, code: str = ""
) -> _Report:
    """
    Start the child that writes snapshot ``seq`` of ``datadir``; its
    :attr:`_Report.done` fires with (path, payload size) or fails with
    :class:`~txjournal.errors.SnapshotError` (:class:`ProcessFailed` when
    the process itself reported an error).
    """
    report = _Report(seq, reactor)
    env = dict(os.environ)
    # The parent's import path, so the child finds txjournal and the
    # application where the parent did (twistd and python -m set it up
    # differently, and either may have been found through sys.path edits).
    env["TXJOURNAL_SYS_PATH"] = json.dumps([p or os.getcwd() for p in sys.path])
    args = [
        sys.executable, "-c", _BOOTSTRAP,
        "--app", app, "--schema-name", schema_name, "--seq", str(seq),
        "--parent", str(os.getpid()), "--code", code, datadir,
    ]
    # Its stdout is the application's: to /dev/null, not a pipe to read.
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        reactor.spawnProcess(
            report, sys.executable, args, env=env, path=os.getcwd(),
            childFDs={0: "w", 1: devnull, 2: "r", REPORT_FD: "r"},
        )
    finally:
        os.close(devnull)
    return report


def write(app: str, schema_name: str, datadir: str, seq: int, code: str = "") -> Written:
    """The child's work: rebuild the model as of ``seq`` and save it."""
    from txjournal.errors import describe_os_error
    from txjournal.history import replay_to
    from txjournal.snapshot.file import FileSnapshotStore
    from txjournal.snapshot.serializer import PickleSerializer
    from txjournal.tap import load_schema

    schema = load_schema(app, add_cwd=False)  # the service's sys.path, as it is
    if schema.name != schema_name:
        raise SnapshotError(
            f"{app} is schema {schema.name!r}, but the service runs {schema_name!r}"
        )
    if code and code_fingerprint(app, schema) != code:
        raise SnapshotError(
            f"the code of {app} on disk is not the code the service runs (changed "
            f"since it started): it is not replayed into a snapshot"
        )
    point = replay_to(schema, datadir, until_seq=seq)
    if point.seq != seq:
        raise SnapshotError(
            f"the journal in {datadir} ends at {point.seq}, before the snapshot's {seq}"
        )
    serializer = PickleSerializer()
    payload = serializer.dumps(point.model)
    digest = schema.model_digest(point.model, payload)
    directory = os.path.join(datadir, "snapshots")
    try:
        # clean=False: temp files there are the service's business, not ours.
        path = FileSnapshotStore(directory, clean=False).save(seq, payload, digest)
    except OSError as e:
        raise _SaveFailed(
            f"writing snapshot {seq} in {directory} failed: {describe_os_error(e)}"
        ) from None
    skipped = [(seq, why[:500]) for seq, why in point.skipped_snapshots[:20]]
    return Written(path, len(payload), skipped)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - runs in the child
    """The snapshot process: write the snapshot, report on fd 3, exit."""
    parser = argparse.ArgumentParser(prog="txjournal snapshot process")
    parser.add_argument("--app", required=True)
    parser.add_argument("--schema-name", required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--code", default="")
    parser.add_argument("datadir")
    args = parser.parse_args(argv)
    from txjournal.snapshot.fork import background, die_with_parent

    die_with_parent(args.parent)
    background()
    os.umask(0o077)
    status = 1
    try:
        written = write(args.app, args.schema_name, args.datadir, args.seq, args.code)
        report: dict[str, Any] = {
            "path": written.path, "size": written.size, "skipped": written.skipped,
        }
        status = 0
    except BaseException as e:
        message = str(e) if isinstance(e, SnapshotError) else f"{type(e).__name__}: {e}"
        report = {
            "error": message[:2000], "stage": "save" if isinstance(e, _SaveFailed) else "load",
        }
        print(message, file=sys.stderr)
    try:
        os.write(REPORT_FD, json.dumps(report).encode())
        sys.stdout.flush()
        sys.stderr.flush()
        # What the application started (it is in this process's session and
        # group) goes with it instead of outliving the service.
        # Only if it is its own group (setsid worked): else the group is the
        # service's.
        if os.getpgrp() == os.getpid():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.killpg(os.getpgrp(), signal.SIGTERM)
    except BaseException:
        pass
    finally:
        # os._exit: threads the application started at import must not keep
        # the process (and the service's snapshot) waiting.
        os._exit(status)
