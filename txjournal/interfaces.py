"""
The interfaces between txjournal's layers.

Backends (file, in-memory, later SQL) implement :class:`IJournal` and
:class:`ISnapshotStore`; the engine and service only ever talk to these.
"""

from __future__ import annotations

import builtins

from twisted.application.service import IService
from zope.interface import Attribute, Interface


class IFileSystem(Interface):
    """The disk operations of the file backends, replaceable for fault injection."""

    def open_append(path: str) -> int:
        """Open an existing file for appending; return a descriptor."""

    def create_exclusive(path: str) -> int:
        """Create a new file (mode 0600), failing if it exists."""

    def write(fd: int, data: bytes | memoryview) -> int:
        """Write some bytes; return how many (may be fewer than given)."""

    def fsync(fd: int) -> None:
        """Make a file's data and metadata durable."""

    def fdatasync(fd: int) -> None:
        """Make a file's data durable."""

    def close(fd: int) -> None:
        """Close a descriptor."""

    def truncate(path: str, length: int) -> None:
        """Cut a file to ``length`` bytes."""

    def rename(src: str, dst: str) -> None:
        """Atomically rename ``src`` to ``dst``."""

    def unlink(path: str) -> None:
        """Remove a file."""

    def fsync_dir(path: str) -> None:
        """Make a directory's entries durable."""

    def listdir(path: str) -> list[str]:
        """Names in a directory."""

    def read(path: str) -> bytes:
        """A whole file."""

    def read_prefix(path: str, length: int) -> bytes:
        """At most the first ``length`` bytes of a file."""

    def size(path: str) -> int:
        """A file's size in bytes."""

    def makedirs(path: str) -> None:
        """Create a directory (mode 0700) and its parents if missing."""


class IJournal(Interface):
    """
    An append-only, durable sequence of records with dense sequence numbers.

    Life cycle: :meth:`open`, then :meth:`replay` consumed to the end (which
    repairs a torn tail), then :meth:`append` from one writer thread at a
    time, then :meth:`close`.
    """

    journal_id = Attribute("A random 64-bit integer naming this journal for life.")
    salt = Attribute("``journal_id`` as 8 bytes: goes under every record checksum.")
    next_seq = Attribute("The sequence number the next appended record must carry.")
    location = Attribute("Where the journal lives (a path or URL, no password), for messages.")
    last_time_ns = Attribute(
        "After replay: the time logged with the newest record (0 if none), yielded or not,"
        " so that logged times never go backwards across restarts."
    )

    def open() -> None:
        """Find the journal's parts and check they fit together."""

    def replay(from_seq: int, keep_through: int):  # type: ignore[no-untyped-def]
        """
        Yield every :class:`txjournal.record.Record` with ``seq >= from_seq``
        in order, verifying checksums and density, cutting off a torn tail
        and raising :class:`txjournal.errors.JournalCorrupt` on damage. A
        bad record at or below ``keep_through`` (covered by a snapshot, so
        acknowledged) is damage, never a torn tail.
        """

    def append(data: bytes, first_seq: int, last_seq: int) -> None:
        """
        Durably append encoded records ``first_seq..last_seq`` (blocking; run
        on the writer thread). Raises :class:`OSError` on failure, after
        which the journal accepts nothing more, or
        :class:`~txjournal.errors.NothingWritten` when it failed before
        writing any byte of the batch (callers are then told so).
        """

    def prune(upto_seq: int) -> list[str]:
        """
        Drop storage that holds only records ``<= upto_seq`` (whatever the
        backend can drop without losing later records); return what went.
        """

    def close() -> None:
        """Release files."""


class ISnapshotStore(Interface):
    """Durable, atomic storage of serialized models by the sequence they cover."""

    location = Attribute("Where the snapshots live (a path or URL, no password), for messages.")

    def list() -> builtins.list[int]:
        """Sequence numbers of stored snapshots, newest first."""

    def load(seq: int) -> bytes:
        """The verified payload of one snapshot; raises ``SnapshotError`` if bad."""

    def save(seq: int, payload: bytes, model_digest: bytes | None = None) -> str:
        """
        Store a payload atomically and durably with the model's digest
        (32 bytes; default: the payload's SHA-256); return where it went.
        """

    def model_digest(seq: int) -> bytes:
        """The model digest stored with a snapshot, without loading it."""

    def prune(keep: int) -> builtins.list[int]:
        """Remove all but the newest ``keep`` snapshots; return those removed."""


class ISnapshotSerializer(Interface):
    """Turns a whole model into bytes and back."""

    def dumps(model: object) -> bytes:
        """Serialize the model."""

    def loads(data: bytes) -> object:
        """Rebuild the model."""


class IJournalService(IService):
    """The public face of a running journal."""

    def execute(command: object):  # type: ignore[no-untyped-def]
        """Journal, sync and apply a command; Deferred of its result."""

    def query(query: object, /, **kwargs: object) -> object:
        """Run a named query (or a function of the model) and return its value."""

    def snapshot():  # type: ignore[no-untyped-def]
        """Write a snapshot; Deferred of the sequence number it covers."""

    def when_ready():  # type: ignore[no-untyped-def]
        """Deferred that fires once start-up replay has finished."""
