"""Schema registration, encoding, upgrades and argument checking."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from txjournal import CommandEncodeError, Context, InvalidArguments, Schema, UnknownCommand
from txjournal.errors import SchemaError


def make_schema() -> Schema[dict[str, Any]]:
    schema: Schema[dict[str, Any]] = Schema("kv", model=dict)

    @schema.command("put", version=2, upgrade={1: lambda f: {"key": f["k"], "value": f["v"]}})
    @dataclass
    class Put:
        key: str
        value: Any
        tags: list[str] = field(default_factory=list)
        ratio: float = 1.0
        note: str | None = None

        def execute(self, model: dict[str, Any], ctx: Context) -> None:
            model[self.key] = self.value

    @schema.query("get")
    def get(model: dict[str, Any], key: str, default: int = 0) -> Any:
        return model.get(key, default)

    return schema


def test_encode_decode_round_trip_by_name_not_class() -> None:
    schema = make_schema()
    cmd = schema.build_command("put", {"key": "a", "value": {"x": [1, 2.5, None, b"\x00"]}})
    ctype, payload = schema.encode(cmd)
    assert (ctype.name, ctype.version) == ("put", 2)
    assert b"Put" not in payload and b"test_schema" not in payload
    assert schema.decode("put", 2, payload) == cmd


def test_upgrade_from_old_version() -> None:
    import msgpack

    schema = make_schema()
    old = msgpack.packb({"k": "a", "v": 3})
    cmd = schema.decode("put", 1, old)
    assert (cmd.key, cmd.value) == ("a", 3)  # type: ignore[attr-defined]
    with pytest.raises(InvalidArguments, match="newer than this code"):
        schema.decode("put", 3, old)


def test_unencodable_fields() -> None:
    schema = make_schema()
    cmd = schema.build_command("put", {"key": "a", "value": 1})
    cmd.value = {1, 2}  # type: ignore[attr-defined]
    with pytest.raises(CommandEncodeError, match="'put' cannot be journaled"):
        schema.encode(cmd)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"value": 1}, "missing argument"),
        ({"key": 1, "value": 1}, "expected str"),
        ({"key": "a", "value": 1, "tags": ["x", 2]}, r"put.tags\[1\]"),
        ({"key": "a", "value": 1, "tags": "x"}, "expected list"),
        ({"key": "a", "value": 1, "note": 5}, "is not"),
        ({"key": "a", "value": object()}, "not a plain value"),
        ({"key": "a", "value": 1, "bogus": 1}, "no argument 'bogus'"),
    ],
)
def test_build_command_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArguments, match=message):
        make_schema().build_command("put", kwargs)


def test_build_command_widens_int_to_float_and_accepts_optional() -> None:
    cmd = make_schema().build_command("put", {"key": "a", "value": 1, "ratio": 2, "note": None})
    assert cmd.ratio == 2.0 and isinstance(cmd.ratio, float)  # type: ignore[attr-defined]


def test_unknown_command_lists_known() -> None:
    with pytest.raises(UnknownCommand, match=r"no command named 'pot' \(known: put\)"):
        make_schema().build_command("pot", {})


def test_registration_errors() -> None:
    schema = make_schema()

    class NotADataclass:
        def execute(self, model: Any, ctx: Context) -> None: ...

    with pytest.raises(SchemaError, match="must be a dataclass"):
        schema.command("x")(NotADataclass)

    @dataclass
    class NoExecute:
        a: int

    with pytest.raises(SchemaError, match="no execute"):
        schema.command("y")(NoExecute)
    with pytest.raises(SchemaError, match="twice"):
        schema.command("put")(make_schema().commands["put"].cls)
    with pytest.raises(SchemaError, match="longer than 255"):
        schema.command("z" * 256)
    with pytest.raises(SchemaError, match="not older"):
        schema.command("w", version=2, upgrade={2: lambda f: f})
    with pytest.raises(SchemaError, match="twice"):
        schema.query("get")(lambda m: None)


def test_retired_names() -> None:
    schema = make_schema()
    schema.retire("old")
    assert schema.is_retired("old")
    with pytest.raises(SchemaError):
        schema.retire("put")


def test_describe() -> None:
    d = make_schema().describe()
    assert d["commands"]["put"]["fields"]["key"] == "str"
    assert d["commands"]["put"]["version"] == 2
    assert d["queries"]["get"]["arguments"] == {"key": "str", "default": "int"}


def test_cyclic_or_deep_arguments_are_refused() -> None:
    schema = make_schema()
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(InvalidArguments, match="nested deeper"):
        schema.build_command("put", {"key": "a", "value": cyclic})

    @schema.query("anything")
    def anything(model: Any, **kwargs: Any) -> None: ...

    with pytest.raises(InvalidArguments, match="nested deeper"):
        schema.bind_query("anything", {"x": cyclic})


def test_failing_upgrade_names_command_and_version() -> None:
    import msgpack

    with pytest.raises(InvalidArguments, match=r"upgrading command 'put' from version 1 failed: KeyError"):
        make_schema().decode("put", 1, msgpack.packb({"wrong": 1}))
