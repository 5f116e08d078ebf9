"""
``txjournal.fastbanana`` against Twisted's own Banana decoder: the same
streams (valid, damaged, random), split at the same random points, must
give the same expressions and the same errors.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.spread import banana

from txjournal.fastbanana import FastBananaMixin
from txjournal.pb import QuietBroker


class Recording(banana.Banana):
    def __init__(self, dialect: bytes | None = b"pb") -> None:
        super().__init__(isClient=1)
        self.setPrefixLimit(banana._PREFIX_LIMIT)
        self.currentDialect = dialect
        self.got: list[Any] = []

    def expressionReceived(self, lst: Any) -> None:
        self.got.append(lst)


class FastRecording(FastBananaMixin, Recording):
    pass


def feed(decoder: Recording, chunks: list[bytes]) -> tuple[str, str | None]:
    error = None
    try:
        for chunk in chunks:
            decoder.dataReceived(chunk)
    except Exception as e:
        error = type(e).__name__
    return repr(decoder.got), error


def encode(obj: Any) -> bytes:
    encoder = banana.Banana()
    encoder.setPrefixLimit(banana._PREFIX_LIMIT)
    encoder._selectDialect(b"pb")
    out: list[bytes] = []
    encoder._encode(obj, out.append)
    return b"".join(out)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


values = st.recursive(
    st.none().map(lambda _: b"None")  # a vocabulary word: sent as VOCAB in the pb dialect
    | st.binary(max_size=40)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=6),
    max_leaves=30,
)


def same(chunks: list[bytes], dialect: bytes | None = b"pb") -> None:
    slow, fast = Recording(dialect), FastRecording(dialect)
    fast_result, slow_result = feed(fast, chunks), feed(slow, chunks)
    assert fast_result == slow_result
    if slow_result[1] is None:  # what waits for more data is the same too
        assert fast.buffer == slow.buffer and repr(fast.listStack) == repr(slow.listStack)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(values, min_size=1, max_size=5), st.lists(st.integers(min_value=0), max_size=8))
def test_valid_streams_split_anywhere(objs: list[Any], cuts: list[int]) -> None:
    data = b"".join(encode(o) for o in objs)
    same(split(data, cuts))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(values, min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=4),
    st.lists(st.integers(min_value=0), max_size=5),
)
def test_damaged_streams(objs: list[Any], flips: list[tuple[int, int]], cuts: list[int]) -> None:
    data = bytearray(b"".join(encode(o) for o in objs))
    for where, value in flips:
        data[where % len(data)] = value
    same(split(bytes(data), cuts))


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=5))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    same(split(data, cuts))


@given(st.binary(max_size=60))
def test_vocabulary_refused_outside_the_pb_dialect(data: bytes) -> None:
    same([encode([b"None", 1]) + data], dialect=b"none")


def test_limits() -> None:
    for stream in (
        b"\x01" * 65,  # a prefix over the limit, no type byte yet
        b"\x01" * 65 + banana.INT,  # over the limit, type byte present
        b"\x7f\x7f\x7f\x7f" + banana.LIST,  # a list over SIZE_LIMIT
        b"\x7f\x7f\x7f\x7f" + banana.STRING,  # a string over SIZE_LIMIT
        b"\x01\x8f",  # an unknown type byte
        b"\x7f" + banana.VOCAB,  # an unknown vocabulary number
    ):
        slow, fast = Recording(), FastRecording()
        assert feed(fast, [stream]) == feed(slow, [stream]), stream
        assert feed(FastRecording(), [stream])[1] is not None, stream


def test_the_pb_broker_uses_it() -> None:
    assert QuietBroker.dataReceived is FastBananaMixin.dataReceived
