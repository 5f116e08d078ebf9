"""
Exceptions raised by txjournal.

Every error names what was wrong (a command name, a file and offset, the
holder of a lock) because the person reading it is usually an operator at
start-up time, with nothing but the message to go on.
"""

from __future__ import annotations

import errno
import os


class TxJournalError(Exception):
    """Base class of every error txjournal raises on purpose."""


class SchemaError(TxJournalError):
    """A command or query was registered in a way that cannot work."""


class UnknownCommand(TxJournalError):
    """No command is registered under this name."""

    def __init__(self, name: str, schema: str, known: list[str]) -> None:
        self.name = name
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"schema {schema!r} has no command named {name!r} (known: {listed})"
        )


class UnknownQuery(TxJournalError):
    """No query is registered under this name."""

    def __init__(self, name: str, schema: str, known: list[str]) -> None:
        self.name = name
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"schema {schema!r} has no query named {name!r} (known: {listed})"
        )


class InvalidArguments(TxJournalError):
    """Arguments given for a command or query do not fit its signature."""


class CommandEncodeError(TxJournalError):
    """
    A command's fields cannot be encoded for the journal.

    Raised by ``execute`` before anything is written: the command is rejected,
    not failed, so it is not part of history.
    """


class JournalCorrupt(TxJournalError):
    """
    The journal holds damage that is not a torn tail.

    Start-up refuses to go on, because skipping a record would silently change
    history. ``python -m txjournal verify DATADIR`` shows the whole picture.
    """

    def __init__(
        self,
        path: str,
        offset: int,
        seq: int | None,
        reason: str,
        command: str | None = None,
    ) -> None:
        self.path = path
        self.offset = offset
        self.seq = seq
        self.reason = reason
        self.command = command
        where = f"{path} at offset {offset}"
        if seq is not None:
            where += f" (sequence number {seq}"
            if command is not None:
                where += f", command {command!r}"
            where += ")"
        super().__init__(
            f"journal is corrupt: {reason}: {where}; "
            f"run 'python -m txjournal verify' on the data directory for details"
        )


class JournalWriteError(TxJournalError):
    """
    Writing or syncing the journal failed.

    The outcome of the batch on disk is unknown, so the journal stops: every
    pending command fails with this error and new commands are refused until
    the service is restarted, which recovers exactly what reached the disk.
    """


class NothingWritten(TxJournalError):
    """
    A journal failed a batch before writing any byte of it (say, the new
    segment it needed could not be created), so its commands are known not
    to be in the journal; the cause is ``__cause__``. The engine still stops
    (as for any write error) but tells callers their commands were not
    written instead of "outcome unknown".
    """


class JournalFailed(JournalWriteError):
    """The journal stopped after a write error; it accepts no more commands."""


class JournalOverloaded(TxJournalError):
    """Too many commands are waiting for the disk; try again later."""


class NotRunning(TxJournalError):
    """The service is not running (not started yet, or stopping)."""


class DataDirLocked(TxJournalError):
    """Another process (or service) owns the data directory."""

    def __init__(self, path: str, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"data directory {os.path.dirname(path)} is locked by another process or "
            f"service ({holder}; lock file {path})"
        )


class UnsafeDataDir(TxJournalError):
    """The data directory's permissions would expose or endanger the data."""


class SnapshotError(TxJournalError):
    """A snapshot could not be written or loaded."""


class RecoveryError(TxJournalError):
    """Start-up could not rebuild the model from snapshots and journal."""


class ReadOnlyReplica(TxJournalError):
    """A replica was asked to change something: only the writer may."""

    def __init__(self, writer: str, what: str) -> None:
        self.writer = writer
        super().__init__(
            f"{what}: this is a read-only replica of the journal in {writer}; "
            f"send commands to the writer of that journal"
        )


class WriterActive(TxJournalError):
    """
    Another process holds the writer's lease on a PostgreSQL journal: it is
    alive and connected, so this one may not write. Stop it first, or take
    over (``twistd journal --take-over``, ``python -m txjournal promote
    --take-over``), which fences it.
    """


def describe_os_error(e: BaseException) -> str:
    """An I/O error as an operator should read it: a full disk said plainly."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full: {e}"
    return f"{type(e).__name__}: {e}"
