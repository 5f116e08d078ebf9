"""Type hints for the C extension ``txjournal._speedups`` (see ``_speedups.c``)."""

from collections.abc import Callable
from typing import Any

from txjournal.record import RecordTuple

#: Whether :func:`crc32c` (and the record checksums) use the CPU's SSE4.2
#: ``crc32`` instruction rather than the table-driven code.
HARDWARE_CRC32C: bool

def decode_run(
    buf: bytes,
    offset: int,
    end: int,
    salt_state: int,
    length_states: dict[int, int],
    expected: int,
    limit: int,
) -> tuple[list[RecordTuple], int]: ...
def frame_record(
    seq: int, time_ns: int, rest: bytes, payload: bytes, salt_state: int
) -> bytes: ...
def crc32c(data: bytes | bytearray | memoryview, value: int = 0, /) -> int: ...
def _crc32c_portable(data: bytes | bytearray | memoryview, value: int = 0, /) -> int: ...
def apply_run(
    records: list[RecordTuple],
    start: int,
    plan: dict[str, tuple[type, int]],
    context: Callable[[int, int, int, str | None], Any],
    journal_id: int,
    model: Any,
    unpackb: Callable[[bytes], Any],
    /,
) -> tuple[int, list[tuple[int, str, Exception]] | None]: ...
