"""
Snapshots written by a forked child, as Redis does its RDB saves.

The child gets a copy-on-write image of the model frozen at the moment of
the fork, serializes it and writes the snapshot file, while the parent's
reactor goes straight back to work: the reactor stalls only for the
``fork()`` itself (page-table copy), not for pickling a large model.

The price is memory: pages the parent changes while the child runs are
copied, and CPython's reference counting makes the child touch (and so
copy) every page it pickles. Budget up to twice the model's size.
"""

from __future__ import annotations

import gc
import os
import signal
from typing import Any

from txjournal.errors import SnapshotError
from txjournal.interfaces import ISnapshotSerializer, ISnapshotStore
from txjournal.schema import Schema

_MAX_REPORT = 4096


def available() -> bool:
    return hasattr(os, "fork")


def start(
    model: Any,
    seq: int,
    serializer: ISnapshotSerializer,
    schema: Schema[Any],
    store: ISnapshotStore,
) -> tuple[int, int]:
    """Fork a child that saves ``model`` as snapshot ``seq``; return (pid, pipe)."""
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collection may run between fork and exec-less exit
    try:
        pid = os.fork()
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
    if pid == 0:  # pragma: no cover - runs in the child, checked by its report
        _child(model, seq, serializer, schema, store, read_fd, write_fd, parent)
    os.close(write_fd)
    return pid, read_fd


def _child(
    model: Any,
    seq: int,
    serializer: ISnapshotSerializer,
    schema: Schema[Any],
    store: ISnapshotStore,
    read_fd: int,
    write_fd: int,
    parent: int,
) -> None:  # pragma: no cover - child process
    code = 1
    die_with_parent(parent)
    background()
    try:
        # Nothing of the parent's event loop may run here: no signal
        # handlers, no wake-up pipe, no inherited sockets, locks or journal
        # files (a child outliving a killed parent must not keep the data
        # directory's LOCK or the PB port).
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.close(read_fd)
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, max(write_fd + 2, os.sysconf("SC_OPEN_MAX")))
        payload = serializer.dumps(model)
        digest = schema.model_digest(model, payload)
        path = store.save(seq, payload, digest)
        report = b"ok\0" + path.encode() + b"\0" + str(len(payload)).encode()
        code = 0
    except BaseException as e:
        report = b"error\0" + f"{type(e).__name__}: {e}".encode("utf-8", "replace")
    try:
        os.write(write_fd, report[:_MAX_REPORT])
    finally:
        os._exit(code)


def background() -> None:  # pragma: no cover - child process
    """
    Background work: on a busy machine the service's reactor (and its
    journal writer) must win the CPU over a snapshot process, at once. Nice
    19, not 10: measured on the 2-core development VM, with nice 10 the
    reactor, woken from its poll, waited up to 28-38 ms for a CPU while a
    replaying snapshot process loaded a 1 GiB snapshot; with 19, under 8 ms.
    (SCHED_IDLE did as well, but can starve the snapshot for ever on a
    saturated machine, and a starved process holding the file system's
    journal would hold up the service's own syncs.)
    """
    try:
        os.nice(19 - os.nice(0))
    except OSError:
        pass


def die_with_parent(parent: int) -> None:  # pragma: no cover - child process
    """
    A child outliving a killed service would go on writing into a data
    directory whose LOCK it does not hold (and that a new owner may already
    use): on Linux, have the kernel kill it with its parent.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def wait(pid: int, read_fd: int) -> tuple[str, int]:
    """
    Block until the child is done (run it off the reactor thread); return
    the snapshot's path and payload size or raise :class:`SnapshotError`.
    """
    chunks = []
    try:
        while True:
            chunk = os.read(read_fd, _MAX_REPORT)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    _pid, status = os.waitpid(pid, 0)
    report = b"".join(chunks)
    if os.WIFSIGNALED(status):
        raise SnapshotError(
            f"the snapshot child process {pid} was killed by signal {os.WTERMSIG(status)}"
        )
    parts = report.split(b"\0")
    if os.WEXITSTATUS(status) == 0 and parts[0] == b"ok" and len(parts) == 3:
        return parts[1].decode(), int(parts[2])
    message = parts[1].decode("utf-8", "replace") if len(parts) > 1 else "no report"
    raise SnapshotError(
        f"the snapshot child process {pid} failed (exit status "
        f"{os.WEXITSTATUS(status)}): {message}"
    )
