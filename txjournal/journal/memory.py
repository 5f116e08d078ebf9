"""
In-memory journal and snapshot store: for fast unit tests and as the
reference that every other backend must behave like. Nothing survives the
process, so never use them for data you want to keep.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
from collections.abc import Iterator

from zope.interface import implementer

from txjournal import record as rec
from txjournal.errors import JournalCorrupt, SnapshotError
from txjournal.interfaces import IJournal, ISnapshotStore


@implementer(IJournal)
class MemoryJournal:
    """
    Keeps the encoded records in a list. ``fail_next`` makes the next
    ``append`` raise, which is how tests inject a write error.
    """

    def __init__(self) -> None:
        self.journal_id = secrets.randbits(64)
        self.salt = self.journal_id.to_bytes(8, "little")
        self.next_seq = 1
        self.location = "<memory journal>"
        self.last_time_ns = 0
        self.data: list[bytes] = []
        self.appends = 0
        self.fail_next: BaseException | None = None
        self.closed = False

    def open(self) -> None:
        self.closed = False

    def replay(self, from_seq: int = 1, keep_through: int = 0) -> Iterator[rec.Record]:
        blob = b"".join(self.data)
        expected = 1
        records = rec.iter_records(blob, 0, self.salt)
        while True:
            try:
                offset, record = next(records)
            except StopIteration:
                break
            except rec.RecordError as e:
                raise JournalCorrupt("<memory>", 0, e.seq, e.reason) from None
            self.last_time_ns = record.time_ns
            if record.seq != expected:
                raise JournalCorrupt("<memory>", offset, record.seq, f"expected {expected}")
            expected += 1
            if record.seq >= from_seq:
                yield record
        self.next_seq = expected

    def append(self, data: bytes, first_seq: int, last_seq: int) -> None:
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        if first_seq != self.next_seq:
            raise ValueError(f"append of {first_seq} but the journal expects {self.next_seq}")
        self.data.append(data)
        self.appends += 1
        self.next_seq = last_seq + 1

    def prune(self, upto_seq: int) -> list[str]:
        # Kept whole: replay() of the memory journal always starts at 1.
        return []

    def close(self) -> None:
        self.closed = True


@implementer(ISnapshotStore)
class MemorySnapshotStore:
    def __init__(self) -> None:
        self.snapshots: dict[int, bytes] = {}
        self.digests: dict[int, bytes] = {}
        self.location = "<memory snapshots>"

    def list(self) -> builtins.list[int]:
        return sorted(self.snapshots, reverse=True)

    def load(self, seq: int) -> bytes:
        try:
            return self.snapshots[seq]
        except KeyError:
            raise SnapshotError(f"no snapshot at {seq}") from None

    def model_digest(self, seq: int) -> bytes:
        self.load(seq)
        return self.digests.get(seq) or hashlib.sha256(self.snapshots[seq]).digest()

    def save(self, seq: int, payload: bytes, model_digest: bytes | None = None) -> str:
        self.snapshots[seq] = payload
        self.digests[seq] = model_digest or hashlib.sha256(payload).digest()
        return f"<memory:{seq}>"

    def prune(self, keep: int) -> builtins.list[int]:
        if keep < 1:
            # As the file store: pruning to nothing is a caller's bug, not a request.
            raise ValueError("keep at least one snapshot")
        removed = self.list()[keep:]
        for seq in removed:
            del self.snapshots[seq]
            self.digests.pop(seq, None)
        return removed
