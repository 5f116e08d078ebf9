"""
replaying.apply_run: the C version (txjournal._speedups) against the
pure-Python reference, on random runs of records that mix every case the
fast path must apply, skip or stop before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txjournal import replaying
from txjournal.record import KIND_COMMAND, KIND_QUERY
from txjournal.schema import Context

speedups = pytest.importorskip("txjournal._speedups")


class Model:
    def __init__(self) -> None:
        self.log: list[Any] = []


@dataclass
class Add:
    x: int

    def execute(self, model: Model, ctx: Context) -> None:
        model.log.append(("add", self.x, ctx.seq, ctx.time_ns, ctx.user))


@dataclass
class Boom:
    x: int

    def execute(self, model: Model, ctx: Context) -> None:
        if self.x % 3 == 0:
            raise ValueError(f"boom {self.x}")
        model.log.append(("boom", self.x, ctx.seq))


@dataclass
class Strict:
    x: int

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("negative")

    def execute(self, model: Model, ctx: Context) -> None:
        model.log.append(("strict", self.x))


PLAN: dict[str, tuple[type, int]] = {"add": (Add, 1), "boom": (Boom, 1), "strict": (Strict, 2)}

payloads = st.one_of(
    st.builds(lambda x: msgpack.packb({"x": x}), st.integers(-5, 50)),
    st.just(msgpack.packb({"y": 1})),  # does not fit the class
    st.just(msgpack.packb({1: 2})),  # a non-string key
    st.just(msgpack.packb([1, 2])),  # not a map
    st.just(b"\xc1"),  # not MessagePack
    st.just(msgpack.packb({"x": 1}) + b"\x00"),  # extra data
    st.binary(max_size=8),
)
records = st.lists(
    st.tuples(
        st.sampled_from(["add", "boom", "strict", "retired", "add"]),
        st.sampled_from([1, 1, 1, 2]),
        st.sampled_from([KIND_COMMAND] * 6 + [KIND_QUERY, 3]),
        st.one_of(st.none(), st.just("alice")),
        payloads,
    ),
    max_size=30,
)


def run(impl: Any, recs: list[Any], start: int) -> tuple[int, list[Any], list[Any]]:
    model = Model()
    index, raised = impl(recs, start, PLAN, Context, 42, model, msgpack.unpackb)
    errors = [(seq, name, type(e), str(e)) for seq, name, e in (raised or [])]
    if raised is not None:
        assert raised  # None when nothing was raised, never an empty list
    return index, model.log, errors


@settings(max_examples=400, deadline=None)
@given(records, st.integers(0, 35))
def test_c_apply_run_agrees_with_the_reference(spec: list[Any], start: int) -> None:
    recs = [
        (seq, 1_000 + seq, name, version, kind, user, fields)
        for seq, (name, version, kind, user, fields) in enumerate(spec, 1)
    ]
    assert run(speedups.apply_run, recs, start) == run(replaying._py_apply_run, recs, start)


def test_it_stops_before_what_it_cannot_apply() -> None:
    ok = msgpack.packb({"x": 1})
    recs = [
        (1, 0, "add", 1, KIND_COMMAND, None, ok),
        (2, 0, "q", 1, KIND_QUERY, "bob", b""),
        (3, 0, "boom", 1, KIND_COMMAND, None, msgpack.packb({"x": 3})),
        (4, 0, "add", 2, KIND_COMMAND, None, ok),  # an old version: the slow path upgrades it
        (5, 0, "add", 1, KIND_COMMAND, None, ok),
    ]
    for impl in (speedups.apply_run, replaying._py_apply_run):
        model = Model()
        index, raised = impl(recs, 0, PLAN, Context, 7, model, msgpack.unpackb)
        assert index == 3
        assert model.log == [("add", 1, 1, 0, None)]
        assert raised is not None and [(s, n, str(e)) for s, n, e in raised] == [(3, "boom", "boom 3")]
        assert raised[0][2].__traceback__ is not None  # as `except Exception as e` has it
        index, raised = impl(recs, 4, PLAN, Context, 7, model, msgpack.unpackb)
        assert (index, raised) == (5, None)


def test_a_base_exception_from_a_command_propagates() -> None:
    @dataclass
    class Quit:
        def execute(self, model: Model, ctx: Context) -> None:
            raise KeyboardInterrupt

    recs = [(1, 0, "quit", 1, KIND_COMMAND, None, msgpack.packb({}))]
    for impl in (speedups.apply_run, replaying._py_apply_run):
        with pytest.raises(KeyboardInterrupt):
            impl(recs, 0, {"quit": (Quit, 1)}, Context, 0, Model(), msgpack.unpackb)


def test_records_that_are_not_plain_tuples_stop_the_c_run() -> None:
    class Rec(tuple):  # type: ignore[type-arg]
        pass

    recs = [Rec((1, 0, "add", 1, KIND_COMMAND, None, msgpack.packb({"x": 1})))]
    assert speedups.apply_run(recs, 0, PLAN, Context, 0, Model(), msgpack.unpackb) == (0, None)


def test_the_c_version_is_in_use_unless_pure_python_is_asked_for() -> None:
    pure = bool(os.environ.get("TXJOURNAL_PURE_PYTHON"))
    assert replaying.SPEEDUPS is not pure
    assert (replaying.apply_run is speedups.apply_run) is not pure
