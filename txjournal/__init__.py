"""
txjournal: Prevayler-style object prevalence for Twisted.

The model lives in memory; every change is a command written to a journal
and synced before it is applied; snapshots bound replay time.
"""

from txjournal.errors import (
    CommandEncodeError,
    DataDirLocked,
    InvalidArguments,
    JournalCorrupt,
    JournalFailed,
    JournalOverloaded,
    JournalWriteError,
    NothingWritten,
    NotRunning,
    ReadOnlyReplica,
    RecoveryError,
    SnapshotError,
    TxJournalError,
    UnknownCommand,
    UnknownQuery,
)
from txjournal.schema import Context, Schema
from txjournal.service import JournalService

__version__ = "0.1.0"

__all__ = [
    "CommandEncodeError",
    "Context",
    "DataDirLocked",
    "InvalidArguments",
    "JournalCorrupt",
    "JournalFailed",
    "JournalOverloaded",
    "JournalService",
    "JournalWriteError",
    "NotRunning",
    "NothingWritten",
    "ReadOnlyReplica",
    "RecoveryError",
    "Schema",
    "SnapshotError",
    "TxJournalError",
    "UnknownCommand",
    "UnknownQuery",
    "__version__",
]
