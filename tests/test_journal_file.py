"""
Torn and corrupt files: :class:`FileJournal` and :class:`FileSnapshotStore`
at unit level, on real files in ``tmp_path`` (no reactor, no threads).

Records are built with :func:`txjournal.record.encode_record` from the bank
schema's own encoding, exactly as the engine builds them, and written through
``FileJournal.append`` after ``open()`` and a fully consumed ``replay()``.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from examples.bank import Deposit, Transfer, bank
from txjournal.errors import JournalCorrupt, SnapshotError
from txjournal.journal.file import FileJournal, segment_name
from txjournal.record import (
    KIND_COMMAND,
    PREFIX_SIZE,
    SEGMENT_HEADER_SIZE,
    Record,
    encode_record,
    encode_segment_header,
)
from txjournal.snapshot.file import HEADER_SIZE, FileSnapshotStore, snapshot_name

BASE_TIME_NS = 1_700_000_000_000_000_000

# Offsets inside a record: u32 length | u32 crc | u64 seq | ...
SEQ_FIELD = range(PREFIX_SIZE, PREFIX_SIZE + 8)


# -- helpers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """One record as written: its bytes and what replay must give back."""

    seq: int
    data: bytes
    record: Record


def make_record(salt: bytes, seq: int, tag: str = "") -> Written:
    """A deterministic record for ``seq``; ``tag`` varies the fields."""
    if seq % 4 == 0:
        command: object = Transfer(f"acct{seq % 5}{tag}", f"acct{(seq + 1) % 5}", seq)
    else:
        command = Deposit(f"acct{seq % 7}{tag}", seq * 3 + 1)
    ctype, payload = bank.encode(command)
    user = f"user{seq % 3}" if seq % 3 else ""
    time_ns = BASE_TIME_NS + seq * 1000
    data = encode_record(
        salt, seq, time_ns, ctype.name_bytes, ctype.version, payload, user.encode()
    )
    record = Record(seq, time_ns, ctype.name, ctype.version, KIND_COMMAND, user or None, payload)
    return Written(seq, data, record)


def open_journal(
    directory: Path, segment_size: int = 1 << 20, readonly: bool = False
) -> tuple[FileJournal, list[Record]]:
    """Open and fully replay a journal, as the service does at start-up."""
    journal = FileJournal(
        str(directory), segment_size=segment_size, sync=False, readonly=readonly
    )
    journal.open()
    return journal, list(journal.replay())


def append(journal: FileJournal, count: int, batch: int = 1, tag: str = "") -> list[Written]:
    """Append ``count`` records at ``journal.next_seq`` in batches of ``batch``."""
    written: list[Written] = []
    while len(written) < count:
        n = min(batch, count - len(written))
        first = journal.next_seq
        chunk = [make_record(journal.salt, seq, tag) for seq in range(first, first + n)]
        journal.append(b"".join(w.data for w in chunk), first, first + n - 1)
        assert journal.next_seq == first + n
        written.extend(chunk)
    return written


def new_journal(
    directory: Path, count: int, batch: int = 1, segment_size: int = 1 << 20
) -> list[Written]:
    journal, records = open_journal(directory, segment_size)
    assert records == []
    written = append(journal, count, batch)
    journal.close()
    return written


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".log"))


def record_ends(written: list[Written], start: int = SEGMENT_HEADER_SIZE) -> list[int]:
    """The file offset just after each record, for records in one segment."""
    ends = []
    offset = start
    for w in written:
        offset += len(w.data)
        ends.append(offset)
    return ends


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# -- round trip -------------------------------------------------------------------


def test_records_round_trip_across_reopen(tmp_path: Path) -> None:
    written = new_journal(tmp_path, 20, batch=3)
    journal, records = open_journal(tmp_path)
    assert records == [w.record for w in written]
    assert journal.next_seq == 21
    assert journal.torn_tail is None
    # The salt comes back from the segment header, so new records verify.
    more = append(journal, 5, batch=2, tag="x")
    journal.close()
    _, records = open_journal(tmp_path)
    assert records == [w.record for w in written + more]
    (seg,) = segment_files(tmp_path)
    assert seg.name == segment_name(1)
    assert stat.S_IMODE(seg.stat().st_mode) == 0o600


def test_replay_from_a_later_sequence_number(tmp_path: Path) -> None:
    written = new_journal(tmp_path, 30, segment_size=200)
    journal = FileJournal(str(tmp_path), segment_size=200, sync=False)
    journal.open()
    assert [r.seq for r in journal.replay(17)] == list(range(17, 31))
    assert journal.next_seq == 31
    assert [w.seq for w in written] == list(range(1, 31))


# -- torn tail: truncation at every offset ----------------------------------------


def test_truncate_at_every_offset_recovers_previous_records(tmp_path: Path) -> None:
    """
    A crash can leave the file cut anywhere after the segment header (the
    header is made durable before the segment gets its name). Every cut
    recovers exactly the records wholly before it, cuts the file back to
    their end, and a following append lands right after them.
    """
    written = new_journal(tmp_path, 5)
    (seg,) = segment_files(tmp_path)
    original = seg.read_bytes()
    ends = record_ends(written)
    assert ends[-1] == len(original)
    last_start = ends[-2]
    cuts = list(range(SEGMENT_HEADER_SIZE, len(original)))
    assert len([c for c in cuts if c > last_start]) == len(written[-1].data) - 1
    for cut in cuts:
        seg.write_bytes(original[:cut])
        good = sum(1 for end in ends if end <= cut)
        good_end = ends[good - 1] if good else SEGMENT_HEADER_SIZE
        journal, records = open_journal(tmp_path)
        assert records == [w.record for w in written[:good]], cut
        assert journal.next_seq == good + 1, cut
        assert seg.stat().st_size == good_end, cut
        if cut == good_end:
            assert journal.torn_tail is None, cut
        else:
            assert journal.torn_tail is not None, cut
            assert journal.torn_tail[:2] == (str(seg), good_end), cut
        more = append(journal, 2, tag="after")
        journal.close()
        _, records = open_journal(tmp_path)
        assert records == [w.record for w in written[:good] + more], cut
        assert seg.stat().st_size == good_end + sum(len(w.data) for w in more), cut


def test_readonly_reports_torn_tail_without_cutting(tmp_path: Path) -> None:
    written = new_journal(tmp_path, 4)
    (seg,) = segment_files(tmp_path)
    torn = seg.read_bytes()[:-3]
    seg.write_bytes(torn)
    journal, records = open_journal(tmp_path, readonly=True)
    assert records == [w.record for w in written[:3]]
    assert journal.torn_tail is not None
    assert journal.torn_tail[:2] == (str(seg), record_ends(written)[2])
    assert seg.read_bytes() == torn
    with pytest.raises(ValueError, match="read-only"):
        journal.append(make_record(journal.salt, 4).data, 4, 4)


def test_bad_checksum_in_last_record_is_cut_as_a_torn_write(tmp_path: Path) -> None:
    """
    With nothing valid after it, a damaged last record cannot be told from a
    torn write (pages of an unsynced write can land in any order), so it is
    cut off, never replayed.
    """
    written = new_journal(tmp_path, 4)
    (seg,) = segment_files(tmp_path)
    last_start = record_ends(written)[2]
    flip(seg, last_start + 30)
    journal, records = open_journal(tmp_path)
    assert records == [w.record for w in written[:3]]
    assert journal.torn_tail is not None and "checksum" in journal.torn_tail[2]
    assert seg.stat().st_size == last_start


# -- corruption in the middle ------------------------------------------------------


def _corrupt_middle(tmp_path: Path) -> tuple[Path, bytes, int, int]:
    written = new_journal(tmp_path, 5)
    (seg,) = segment_files(tmp_path)
    ends = record_ends(written)
    return seg, seg.read_bytes(), ends[1], ends[2]


def test_flipped_byte_in_a_middle_record_is_corruption(tmp_path: Path) -> None:
    seg, original, start, end = _corrupt_middle(tmp_path)
    offsets = [o for o in range(start, end) if o - start not in SEQ_FIELD]
    assert len(offsets) > 40
    for offset in offsets:
        for mask in (0x01, 0x80):
            seg.write_bytes(original)
            flip(seg, offset, mask)
            journal = FileJournal(str(tmp_path), sync=False)
            journal.open()
            with pytest.raises(JournalCorrupt) as info:
                list(journal.replay())
            e = info.value
            assert (e.path, e.offset, e.seq) == (str(seg), start, 3), (offset, mask)
            message = str(e)
            assert str(seg) in message and f"offset {start}" in message
            assert "sequence number 3" in message and "verify" in message
            # Refusing must not repair anything: the evidence stays on disk.
            assert seg.read_bytes() != original and len(seg.read_bytes()) == len(original)


def test_flipped_byte_in_seq_field_names_the_expected_seq(tmp_path: Path) -> None:
    seg, original, start, _end = _corrupt_middle(tmp_path)
    reported = []
    for offset in (start + i for i in SEQ_FIELD):
        seg.write_bytes(original)
        flip(seg, offset, 0x01)
        journal = FileJournal(str(tmp_path), sync=False)
        journal.open()
        with pytest.raises(JournalCorrupt) as info:
            list(journal.replay())
        assert (info.value.path, info.value.offset) == (str(seg), start)
        reported.append(info.value.seq)
    assert reported == [3] * 8


def test_flipped_byte_in_a_full_segment_is_corruption(tmp_path: Path) -> None:
    """Damage at the end of a segment that is not the last one is never a torn write."""
    new_journal(tmp_path, 12, segment_size=200)
    segs = segment_files(tmp_path)
    assert len(segs) >= 3
    first = segs[0]
    size = first.stat().st_size
    flip(first, size - 5)
    journal = FileJournal(str(tmp_path), segment_size=200, sync=False)
    journal.open()
    with pytest.raises(JournalCorrupt, match="invalid record") as info:
        list(journal.replay())
    assert info.value.path == str(first)
    assert SEGMENT_HEADER_SIZE <= info.value.offset < size
    assert first.stat().st_size == size


def test_garbage_file_named_as_a_segment(tmp_path: Path) -> None:
    rng = random.Random(7)
    seg = tmp_path / segment_name(1)
    seg.write_bytes(bytes(rng.randrange(256) for _ in range(500)))
    journal = FileJournal(str(tmp_path), sync=False)
    journal.open()
    with pytest.raises(JournalCorrupt, match="bad segment header") as info:
        list(journal.replay())
    assert (info.value.path, info.value.offset) == (str(seg), 0)
    assert str(seg) in str(info.value)


def test_garbage_file_named_as_a_later_segment(tmp_path: Path) -> None:
    written = new_journal(tmp_path, 6)
    seg = tmp_path / segment_name(7)
    seg.write_bytes(b"this is not a journal segment at all\n" * 10)
    journal = FileJournal(str(tmp_path), sync=False)
    journal.open()
    replayed: list[Record] = []
    with pytest.raises(JournalCorrupt, match="bad magic") as info:
        replayed.extend(journal.replay())
    assert replayed == [w.record for w in written]
    assert info.value.path == str(seg)


def test_segment_of_another_journal(tmp_path: Path) -> None:
    written = new_journal(tmp_path, 3)
    journal, _ = open_journal(tmp_path)
    other_salt = (journal.journal_id ^ 1).to_bytes(8, "little")
    seg = tmp_path / segment_name(4)
    seg.write_bytes(
        encode_segment_header(journal.journal_id ^ 1, 4) + make_record(other_salt, 4).data
    )
    journal = FileJournal(str(tmp_path), sync=False)
    journal.open()
    with pytest.raises(JournalCorrupt, match="another journal") as info:
        list(journal.replay())
    assert info.value.path == str(seg)
    assert len(written) == 3


def test_segment_header_disagreeing_with_its_name(tmp_path: Path) -> None:
    new_journal(tmp_path, 3)
    journal, _ = open_journal(tmp_path)
    journal.close()
    seg = tmp_path / segment_name(4)
    seg.write_bytes(encode_segment_header(journal.journal_id, 5))
    journal = FileJournal(str(tmp_path), sync=False)
    journal.open()
    with pytest.raises(JournalCorrupt, match="header says it starts at 5, its name says 4") as info:
        list(journal.replay())
    assert info.value.path == str(seg)


@pytest.mark.parametrize("position", ["only", "last"])
def test_empty_segment_file_is_a_clear_error(tmp_path: Path, position: str) -> None:
    """
    A segment gets its name only once its header is durable, so an empty
    one is damage (or a foreign file), reported with its path.
    """
    if position == "last":
        new_journal(tmp_path, 3)
        seg = tmp_path / segment_name(4)
    else:
        seg = tmp_path / segment_name(1)
    seg.write_bytes(b"")
    journal = FileJournal(str(tmp_path), sync=False)
    journal.open()
    with pytest.raises(JournalCorrupt, match="header is 0 bytes long") as info:
        list(journal.replay())
    assert (info.value.path, info.value.offset) == (str(seg), 0)
    assert seg.exists() and seg.stat().st_size == 0


def test_header_only_segment_is_an_empty_journal_tail(tmp_path: Path) -> None:
    written = new_journal(tmp_path, 3)
    journal, _ = open_journal(tmp_path)
    journal.close()
    (tmp_path / segment_name(4)).write_bytes(encode_segment_header(journal.journal_id, 4))
    journal, records = open_journal(tmp_path)
    assert records == [w.record for w in written]
    assert journal.next_seq == 4
    more = append(journal, 2)
    journal.close()
    assert (tmp_path / segment_name(4)).stat().st_size == SEGMENT_HEADER_SIZE + sum(
        len(w.data) for w in more
    )
    _, records = open_journal(tmp_path)
    assert records == [w.record for w in written + more]


# -- segments ----------------------------------------------------------------------


def check_segments(directory: Path, written: list[Written], segment_size: int, batch: int) -> None:
    """Each segment is named after its first record and stays near its size limit."""
    by_seq = {w.seq: w for w in written}
    max_batch = max(len(w.data) for w in written) * batch
    segs = segment_files(directory)
    firsts = [int(p.name[:-4]) for p in segs]
    assert firsts[0] == 1
    for i, path in enumerate(segs):
        data = path.read_bytes()
        last = firsts[i + 1] if i + 1 < len(segs) else max(by_seq) + 1
        body = b"".join(by_seq[s].data for s in range(firsts[i], last))
        assert data[SEGMENT_HEADER_SIZE:] == body, path
        assert len(data) < segment_size + max_batch, path


def test_rollover_across_many_segments(tmp_path: Path) -> None:
    written: list[Written] = []
    journal, _ = open_journal(tmp_path, segment_size=200)
    for batch in (1, 2, 3, 1, 5, 1):
        written += append(journal, 20, batch=batch)
    journal.close()
    segs = segment_files(tmp_path)
    assert len(segs) > 20
    check_segments(tmp_path, written, 200, 5)
    journal, records = open_journal(tmp_path, segment_size=200)
    assert records == [w.record for w in written]
    assert journal.next_seq == len(written) + 1
    more = append(journal, 7, batch=2, tag="z")
    journal.close()
    _, records = open_journal(tmp_path, segment_size=200)
    assert records == [w.record for w in written + more]


def test_rollover_at_every_segment_size(tmp_path: Path) -> None:
    """Vary the size limit so the rollover falls at every offset of a record."""
    record_size = len(make_record(b"\0" * 8, 1).data)
    sizes = range(96, 96 + 3 * record_size + 3)
    for segment_size in sizes:
        directory = tmp_path / str(segment_size)
        written = new_journal(directory, 14, batch=2, segment_size=segment_size)
        assert len(segment_files(directory)) >= 2
        check_segments(directory, written, segment_size, 2)
        journal, records = open_journal(directory, segment_size)
        assert records == [w.record for w in written], segment_size
        more = append(journal, 3)
        journal.close()
        _, records = open_journal(directory, segment_size)
        assert records == [w.record for w in written + more], segment_size


def test_crash_at_every_offset_around_a_segment_boundary(tmp_path: Path) -> None:
    """
    The states a crash can leave around a rollover: the previous segment cut
    anywhere with no next segment yet, or the next segment present (header
    durable) and cut anywhere after its header.
    """
    segment_size = 200
    written = new_journal(tmp_path, 10, segment_size=segment_size)
    segs = segment_files(tmp_path)
    assert len(segs) >= 3
    prev, last = segs[-2], segs[-1]
    prev_bytes, last_bytes = prev.read_bytes(), last.read_bytes()
    last_first = int(last.name[:-4])
    prev_first = int(prev.name[:-4])
    before_prev = [w for w in written if w.seq < prev_first]
    in_prev = [w for w in written if prev_first <= w.seq < last_first]
    in_last = [w for w in written if w.seq >= last_first]
    cases: list[tuple[bool, int, list[Written]]] = []
    for cut in range(SEGMENT_HEADER_SIZE, len(prev_bytes) + 1):
        ends = record_ends(in_prev)
        good = sum(1 for e in ends if e <= cut)
        cases.append((False, cut, before_prev + in_prev[:good]))
    for cut in range(SEGMENT_HEADER_SIZE, len(last_bytes) + 1):
        ends = record_ends(in_last)
        good = sum(1 for e in ends if e <= cut)
        cases.append((True, cut, before_prev + in_prev + in_last[:good]))
    assert len(cases) > 2 * len(in_prev[-1].data)
    for keep_last, cut, expected in cases:
        prev.write_bytes(prev_bytes if keep_last else prev_bytes[:cut])
        if keep_last:
            last.write_bytes(last_bytes[:cut])
        elif last.exists():
            last.unlink()
        journal, records = open_journal(tmp_path, segment_size)
        assert records == [w.record for w in expected], (keep_last, cut)
        assert journal.next_seq == len(expected) + 1, (keep_last, cut)
        more = append(journal, 4, tag="again")
        journal.close()
        _, records = open_journal(tmp_path, segment_size)
        assert records == [w.record for w in expected + more], (keep_last, cut)
        check_segments(tmp_path, expected + more, segment_size, 1)
        for extra in segment_files(tmp_path):
            if extra not in (prev, last) and int(extra.name[:-4]) > prev_first:
                extra.unlink()


def test_torn_header_of_last_segment_is_reported(tmp_path: Path) -> None:
    """Cannot come from txjournal's own crash (temp file + rename), so it is not repaired."""
    new_journal(tmp_path, 10, segment_size=200)
    last = segment_files(tmp_path)[-1]
    original = last.read_bytes()
    for cut in range(1, SEGMENT_HEADER_SIZE):
        last.write_bytes(original[:cut])
        journal = FileJournal(str(tmp_path), segment_size=200, sync=False)
        journal.open()
        with pytest.raises(JournalCorrupt, match="bad segment header") as info:
            list(journal.replay())
        assert info.value.path == str(last)


def test_missing_middle_segment_names_the_gap(tmp_path: Path) -> None:
    new_journal(tmp_path, 12, segment_size=200)
    segs = segment_files(tmp_path)
    assert len(segs) >= 3
    gone, after = segs[1], segs[2]
    gone_first, after_first = int(gone.name[:-4]), int(after.name[:-4])
    gone.unlink()
    journal = FileJournal(str(tmp_path), segment_size=200, sync=False)
    journal.open()
    replayed: list[int] = []
    with pytest.raises(JournalCorrupt) as info:
        replayed.extend(r.seq for r in journal.replay())
    e = info.value
    assert replayed == list(range(1, gone_first))
    assert (e.path, e.offset, e.seq) == (str(after), 0, gone_first)
    assert f"records {gone_first}..{after_first - 1} are missing" in str(e)


def test_missing_first_segment_names_the_gap(tmp_path: Path) -> None:
    new_journal(tmp_path, 12, segment_size=200)
    segs = segment_files(tmp_path)
    second_first = int(segs[1].name[:-4])
    segs[0].unlink()
    journal = FileJournal(str(tmp_path), segment_size=200, sync=False)
    journal.open()
    with pytest.raises(JournalCorrupt, match=f"records 1..{second_first - 1} are missing"):
        list(journal.replay())


def test_gap_inside_a_segment_is_corruption(tmp_path: Path) -> None:
    """A valid record whose seq skips ahead (a lost record) is refused, not replayed."""
    journal, _ = open_journal(tmp_path)
    written = append(journal, 3)
    journal.close()
    (seg,) = segment_files(tmp_path)
    with open(seg, "ab") as f:
        f.write(make_record(journal.salt, 5).data + make_record(journal.salt, 6).data)
    journal = FileJournal(str(tmp_path), sync=False)
    journal.open()
    with pytest.raises(JournalCorrupt, match="expected sequence number 4") as info:
        list(journal.replay())
    assert info.value.seq == 5
    assert info.value.offset == record_ends(written)[-1]


def test_leftover_temp_segment_is_removed(tmp_path: Path) -> None:
    """
    A crash between creating a segment's temp file and renaming it leaves
    ``.tmp-<name>``; open() removes it, so the retried rollover can create
    the same temp name again.
    """
    segment_size = 200
    written = new_journal(tmp_path, 9, segment_size=segment_size)
    journal, _ = open_journal(tmp_path, segment_size)
    journal.close()
    next_name = segment_name(journal.next_seq)
    temp = tmp_path / (".tmp-" + next_name)
    temp.write_bytes(encode_segment_header(journal.journal_id, journal.next_seq)[:10])
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("left alone")
    readonly, records = open_journal(tmp_path, segment_size, readonly=True)
    assert records == [w.record for w in written]
    assert temp.exists()
    journal, records = open_journal(tmp_path, segment_size)
    assert not temp.exists()
    assert unrelated.read_text() == "left alone"
    assert records == [w.record for w in written]
    # The tail segment is full, so the next append rolls over to next_name,
    # through the very temp name that was left over.
    assert segment_files(tmp_path)[-1].stat().st_size >= segment_size
    more = append(journal, 8, tag="t")
    journal.close()
    assert (tmp_path / next_name).exists()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    _, records = open_journal(tmp_path, segment_size)
    assert records == [w.record for w in written + more]


def test_append_requires_a_finished_replay(tmp_path: Path) -> None:
    new_journal(tmp_path, 2)
    journal = FileJournal(str(tmp_path), sync=False)
    journal.open()
    with pytest.raises(ValueError, match="replay the journal"):
        journal.append(b"x", 3, 3)
    list(journal.replay())
    with pytest.raises(ValueError, match="expects 3"):
        journal.append(make_record(journal.salt, 4).data, 4, 4)


# -- snapshots ---------------------------------------------------------------------


PAYLOAD = bytes(range(256)) * 3 + b"model"


def saved_snapshot(tmp_path: Path, seq: int = 42, payload: bytes = PAYLOAD) -> tuple[FileSnapshotStore, Path]:
    store = FileSnapshotStore(str(tmp_path / "snapshots"))
    path = Path(store.save(seq, payload))
    assert path.name == snapshot_name(seq)
    return store, path


def test_snapshot_round_trip(tmp_path: Path) -> None:
    store, path = saved_snapshot(tmp_path)
    assert store.list() == [42]
    assert store.load(42) == PAYLOAD
    assert path.stat().st_size == HEADER_SIZE + len(PAYLOAD)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert FileSnapshotStore(str(tmp_path / "snapshots")).load(42) == PAYLOAD


def test_truncated_snapshot_at_every_offset(tmp_path: Path) -> None:
    store, path = saved_snapshot(tmp_path)
    original = path.read_bytes()
    for cut in range(len(original)):
        path.write_bytes(original[:cut])
        with pytest.raises(SnapshotError, match="truncated") as info:
            store.load(42)
        assert str(path) in str(info.value), cut


def test_flipped_byte_in_snapshot_is_detected(tmp_path: Path) -> None:
    """Version 2 puts every header byte under the header checksum."""
    store, path = saved_snapshot(tmp_path)
    original = path.read_bytes()
    for offset in range(len(original)):
        for mask in (0x01, 0x80):
            path.write_bytes(original)
            flip(path, offset, mask)
            with pytest.raises(SnapshotError) as info:
                store.load(42)
            assert str(path) in str(info.value), (offset, mask)


def test_version_1_snapshots_still_load(tmp_path: Path) -> None:
    import hashlib

    from txjournal.record import mask as crc_mask
    from txjournal.snapshot import file as snapfile

    directory = tmp_path / "snapshots"
    directory.mkdir()
    head = snapfile._HEAD_V1.pack(
        snapfile.MAGIC, 1, 0, 0, 7, len(PAYLOAD), hashlib.sha256(PAYLOAD).digest()
    )
    from crc32c import crc32c

    data = head + snapfile._CRC_V1.pack(crc_mask(crc32c(head)), 0) + PAYLOAD
    (directory / snapshot_name(7)).write_bytes(data)
    store = FileSnapshotStore(str(directory))
    assert store.load(7) == PAYLOAD
    assert store.model_digest(7) == hashlib.sha256(PAYLOAD).digest()


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"\0" * 500, bytes(random.Random(3).randrange(256) for _ in range(300))],
    ids=["empty", "short", "zeros", "random"],
)
def test_garbage_snapshot(tmp_path: Path, content: bytes) -> None:
    directory = tmp_path / "snapshots"
    directory.mkdir()
    path = directory / snapshot_name(9)
    path.write_bytes(content)
    store = FileSnapshotStore(str(directory))
    assert store.list() == [9]
    with pytest.raises(SnapshotError) as info:
        store.load(9)
    assert str(path) in str(info.value)


def test_snapshot_renamed_to_another_seq(tmp_path: Path) -> None:
    store, path = saved_snapshot(tmp_path, seq=5)
    path.rename(path.with_name(snapshot_name(6)))
    with pytest.raises(SnapshotError, match="says it covers 5, its name says 6"):
        store.load(6)


def test_missing_snapshot_names_the_file(tmp_path: Path) -> None:
    store = FileSnapshotStore(str(tmp_path / "snapshots"))
    with pytest.raises(SnapshotError, match="cannot be read") as info:
        store.load(3)
    assert store.path(3) in str(info.value)


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    store = FileSnapshotStore(str(tmp_path / "snapshots"))
    for seq in (1, 5, 3, 10, 7, 100):
        store.save(seq, f"model at {seq}".encode())
    (tmp_path / "snapshots" / "README").write_text("not a snapshot")
    assert store.list() == [100, 10, 7, 5, 3, 1]
    assert store.prune(3) == [5, 3, 1]
    assert store.list() == [100, 10, 7]
    assert sorted(os.listdir(tmp_path / "snapshots")) == sorted(
        ["README"] + [snapshot_name(s) for s in (100, 10, 7)]
    )
    assert [store.load(s) for s in store.list()] == [b"model at 100", b"model at 10", b"model at 7"]
    assert store.prune(3) == []
    assert store.prune(1) == [10, 7]
    assert store.list() == [100]
    with pytest.raises(ValueError):
        store.prune(0)


def test_leftover_temp_snapshot_is_removed(tmp_path: Path) -> None:
    directory = tmp_path / "snapshots"
    directory.mkdir()
    temp = directory / (".tmp-" + snapshot_name(8))
    temp.write_bytes(b"half a snapshot")
    FileSnapshotStore(str(directory), readonly=True)
    assert temp.exists()
    store = FileSnapshotStore(str(directory))
    assert not temp.exists()
    assert store.list() == []
    store.save(8, b"whole")
    assert store.load(8) == b"whole"
    assert sorted(os.listdir(directory)) == [snapshot_name(8)]


def test_replay_holds_one_segment_in_memory_at_a_time(tmp_path: Path) -> None:
    """A long journal replays in the memory of one segment, whatever its length."""
    import tracemalloc

    segment = 4 << 20
    journal = FileJournal(str(tmp_path / "j"), segment_size=segment)
    journal.open()
    list(journal.replay())
    payload = b"\x81\xa1x" + bytes([0xC4, 200]) + b"p" * 200  # {"x": 200 bytes}
    seq = 1
    while len(journal.segments) < 4:
        records = [
            encode_record(journal.salt, s, 0, b"deposit", 1, payload) for s in range(seq, seq + 500)
        ]
        journal.append(b"".join(records), seq, seq + 499)
        seq += 500
    journal.close()
    reader = FileJournal(str(tmp_path / "j"), readonly=True)
    reader.open()
    tracemalloc.start()
    try:
        count = sum(len(batch) for batch in reader.replay_batches())
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        reader.close()
    assert count == seq - 1
    # One segment, one batch of decoded records; not two segments.
    assert segment < peak < 1.5 * segment, peak
