"""
A schema names everything that may touch a model: its factory, its commands
and its queries. Pure: no I/O, no reactor.

Commands are stored in the journal by their registered *name* and *version*
with their fields encoded as MessagePack, never by Python import path and
never as pickles, so classes can be renamed and moved, and a journal can be
read without trusting it to run code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import keyword
import random
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

import msgpack

from txjournal.errors import (
    CommandEncodeError,
    InvalidArguments,
    SchemaError,
    UnknownCommand,
    UnknownQuery,
)

M = TypeVar("M")
C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

#: Upgrade function: fields of an old version in, fields of the current one out.
Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


class Context:
    """
    What a command may know besides the model and its own fields.

    Everything here is recorded in (or derived from) the journal, so replay
    sees exactly what the live run saw: ``seq`` is the command's sequence
    number, ``time`` the wall-clock time logged with it (seconds since the
    epoch, never decreasing along the journal), ``random`` a generator
    seeded from the journal's identity and ``seq``.
    """

    __slots__ = ("seq", "time_ns", "user", "_journal_id", "_random")

    def __init__(
        self, seq: int, time_ns: int, journal_id: int, user: str | None = None
    ) -> None:
        self.seq = seq
        self.time_ns = time_ns
        self.user = user
        self._journal_id = journal_id
        self._random: random.Random | None = None

    @property
    def time(self) -> float:
        return self.time_ns / 1e9

    @property
    def random(self) -> random.Random:
        # Created on first use: most commands never draw a number, and
        # seeding a Mersenne Twister costs more than the rest of a command.
        if self._random is None:
            self._random = random.Random(f"txjournal:{self._journal_id}:{self.seq}")
        return self._random


class Command(Protocol):
    def execute(self, model: Any, ctx: Context) -> Any: ...


@dataclasses.dataclass(frozen=True)
class CommandType:
    """A registered command class with its stable name and version."""

    name: str
    version: int
    cls: type
    field_names: tuple[str, ...]
    upgrade: Mapping[int, Upgrade]
    name_bytes: bytes
    #: ``command -> {field: value}``: the fields the journal stores.
    fields_of: Callable[[Any], dict[str, Any]] = dataclasses.field(
        default=None, compare=False, repr=False  # type: ignore[assignment]
    )

    def __post_init__(self) -> None:
        if self.fields_of is None:
            object.__setattr__(self, "fields_of", _fields_getter(self.field_names))


def _fields_getter(names: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
    """
    A function ``command -> {name: command.name, ...}``, generated as
    dataclasses generates ``__init__``: several times faster than a
    comprehension over ``getattr``, which every command pays on the
    reactor thread.
    """
    if all(n.isidentifier() and not keyword.iskeyword(n) and not n.startswith("__") for n in names):
        ns: dict[str, Any] = {}
        items = ", ".join(f"{n!r}: c.{n}" for n in names)
        exec(f"def fields_of(c):\n    return {{{items}}}\n", ns)  # names checked above
        getter: Callable[[Any], dict[str, Any]] = ns["fields_of"]
        return getter
    return lambda c: {n: getattr(c, n) for n in names}


#: Types that MessagePack gives back unchanged (same type, equal value) and
#: that cannot be mutated: a command whose fields are all of these decodes
#: to exactly ``cls(**fields)``. Subclasses (an IntEnum, a str subclass) are
#: not in it on purpose: they come back as the base type. A NaN float is
#: decoded all the same (see :meth:`Schema.encode_live`).
_EXACT_TYPES = frozenset((str, int, float, bool, bytes, type(None)))


@dataclasses.dataclass(frozen=True)
class QueryType:
    name: str
    func: Callable[..., Any]
    signature: inspect.Signature
    #: Record every call of this query in the journal.
    audit: bool = False
    name_bytes: bytes = b""


def _check_name(kind: str, name: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{kind} name must be a non-empty string, got {name!r}")
    encoded = name.encode("utf-8")
    if len(encoded) > 255:
        raise SchemaError(f"{kind} name {name!r} is longer than 255 bytes")
    return encoded


class Schema(Generic[M]):
    """
    The model factory plus every command and query, by stable name.

    ::

        bank = Schema("bank", model=Bank)

        @bank.command("deposit")
        @dataclass
        class Deposit:
            account: str
            amount: int
            def execute(self, model, ctx): ...
    """

    def __init__(
        self,
        name: str,
        model: Callable[[], M],
        digest: Callable[[M], bytes] | None = None,
    ) -> None:
        _check_name("schema", name)
        if not callable(model):
            raise SchemaError(f"model of schema {name!r} must be a zero-argument factory")
        if digest is not None and not callable(digest):
            raise SchemaError(f"digest of schema {name!r} must be a function of the model")
        self.name = name
        self.model_factory = model
        self.digest = digest
        self._commands: dict[str, CommandType] = {}
        self._by_class: dict[type, CommandType] = {}
        self._queries: dict[str, QueryType] = {}
        self._retired: set[str] = set()

    def __repr__(self) -> str:
        return f"<Schema {self.name!r}: {len(self._commands)} commands, {len(self._queries)} queries>"

    # -- registration -------------------------------------------------------

    def command(
        self,
        name: str,
        version: int = 1,
        upgrade: Mapping[int, Upgrade] | None = None,
    ) -> Callable[[C], C]:
        """
        Register a dataclass as the command ``name``.

        ``version`` is stored with every record; ``upgrade`` maps an older
        version to a function that turns that version's fields into the
        current version's, so old journals replay with new code.
        """
        name_bytes = _check_name("command", name)
        if not isinstance(version, int) or version < 1 or version > 0xFFFF:
            raise SchemaError(f"command {name!r}: version must be 1..65535, got {version!r}")
        upgrades = dict(upgrade or {})
        for old in upgrades:
            if not isinstance(old, int) or not 1 <= old < version:
                raise SchemaError(
                    f"command {name!r}: upgrade from version {old!r} is not older "
                    f"than the current version {version}"
                )

        def register(cls: C) -> C:
            if name in self._commands:
                raise SchemaError(f"command {name!r} is registered twice in schema {self.name!r}")
            if name in self._retired:
                raise SchemaError(f"command {name!r} is declared retired")
            if not dataclasses.is_dataclass(cls):
                raise SchemaError(
                    f"command {name!r}: {cls.__qualname__} must be a dataclass "
                    f"(its fields are what the journal stores)"
                )
            if not callable(getattr(cls, "execute", None)):
                raise SchemaError(
                    f"command {name!r}: {cls.__qualname__} has no execute(self, model, ctx) method"
                )
            fields = tuple(f.name for f in dataclasses.fields(cls) if f.init)
            ctype = CommandType(name, version, cls, fields, upgrades, name_bytes)
            self._commands[name] = ctype
            self._by_class[cls] = ctype
            return cls

        return register

    def query(self, name: str, audit: bool = False) -> Callable[[F], F]:
        """
        Register ``func(model, **kwargs)`` as the query ``name``.

        ``audit=True`` records every call in the journal (who, arguments,
        time), whatever the service's ``audit_queries`` setting.
        """
        name_bytes = _check_name("query", name)

        def register(func: F) -> F:
            if name in self._queries:
                raise SchemaError(f"query {name!r} is registered twice in schema {self.name!r}")
            sig = inspect.signature(func)
            if not sig.parameters:
                raise SchemaError(f"query {name!r} must take the model as its first argument")
            self._queries[name] = QueryType(name, func, sig, audit, name_bytes)
            return func

        return register

    def retire(self, *names: str) -> None:
        """
        Declare command names that old journals hold but the code no longer
        has: replay skips their records on purpose instead of stopping.
        """
        for name in names:
            _check_name("command", name)
            if name in self._commands:
                raise SchemaError(f"command {name!r} is registered; it cannot also be retired")
            self._retired.add(name)

    # -- lookup -------------------------------------------------------------

    @property
    def commands(self) -> Mapping[str, CommandType]:
        return types.MappingProxyType(self._commands)

    @property
    def queries(self) -> Mapping[str, QueryType]:
        return types.MappingProxyType(self._queries)

    def is_retired(self, name: str) -> bool:
        return name in self._retired

    def command_type(self, name: str) -> CommandType:
        try:
            return self._commands[name]
        except KeyError:
            raise UnknownCommand(name, self.name, list(self._commands)) from None

    def type_of(self, command: object) -> CommandType:
        try:
            return self._by_class[type(command)]
        except KeyError:
            raise UnknownCommand(
                type(command).__qualname__, self.name, list(self._commands)
            ) from None

    def query_type(self, name: str) -> QueryType:
        try:
            return self._queries[name]
        except KeyError:
            raise UnknownQuery(name, self.name, list(self._queries)) from None

    def new_model(self) -> M:
        return self.model_factory()

    def model_digest(self, model: M, payload: bytes | None = None) -> bytes:
        """
        A 32-byte digest of the model's state, stored with each snapshot so
        that replaying the journal with the current code can be checked
        against it (``python -m txjournal check``).

        By default it is the SHA-256 of the snapshot payload (``payload``, or
        the model pickled if not given). Pickles are only canonical for
        models built the same way, and a set of strings pickles in a
        per-process order: give the schema a ``digest(model) -> bytes``
        that renders the state canonically when that matters.
        """
        if self.digest is not None:
            return hashlib.sha256(self.digest(model)).digest()
        if payload is None:
            from txjournal.snapshot.serializer import PickleSerializer

            payload = PickleSerializer().dumps(model)
        return hashlib.sha256(payload).digest()

    # -- encoding -----------------------------------------------------------

    def encode(self, command: object) -> tuple[CommandType, bytes]:
        """Encode a command's fields; raise :class:`CommandEncodeError` if they cannot be."""
        ctype = self.type_of(command)
        try:
            return ctype, msgpack.packb(ctype.fields_of(command), use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise _encode_error(ctype, e) from None

    def encode_live(
        self, command: object, pack: Callable[[Any], bytes] | None = None
    ) -> tuple[CommandType, bytes, object]:
        """
        :meth:`encode`, plus the command that :meth:`decode` rebuilds from
        those bytes: what the live run executes, so that it cannot differ
        from replay (a caller mutating its object later, a tuple that comes
        back as a list).

        When every field is of an immutable type that MessagePack gives back
        unchanged, decoding would rebuild ``cls(**fields)`` from equal values,
        so the command is rebuilt from the fields directly, without
        decoding; otherwise it is decoded. ``pack`` is a reusable
        ``msgpack.Packer(use_bin_type=True).pack`` (not thread-safe: one per
        thread).
        """
        try:
            ctype = self._by_class[type(command)]
        except KeyError:
            raise UnknownCommand(
                type(command).__qualname__, self.name, list(self._commands)
            ) from None
        fields = ctype.fields_of(command)
        try:
            payload = pack(fields) if pack is not None else msgpack.packb(fields, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise _encode_error(ctype, e) from None
        exact = _EXACT_TYPES
        for value in fields.values():
            # NaN is not equal to itself, so containers find the caller's very
            # object (identity comes first) but not a decoded copy: decode it.
            if type(value) not in exact or value != value:
                return ctype, payload, self.decode(ctype.name, ctype.version, payload)
        try:
            return ctype, payload, ctype.cls(**fields)
        except TypeError as e:
            # As decode() says it.
            raise InvalidArguments(f"fields of command {ctype.name!r} do not fit: {e}") from None

    def decode(self, name: str, version: int, payload: bytes) -> object:
        """
        Rebuild a command from its journal form, upgrading old versions.

        Raises :class:`UnknownCommand`, or :class:`InvalidArguments` when the
        stored fields do not fit the class.
        """
        ctype = self.command_type(name)
        try:
            fields = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as e:
            raise InvalidArguments(f"fields of command {name!r} do not decode: {e}") from None
        if not isinstance(fields, dict):
            raise InvalidArguments(f"fields of command {name!r} are not a map")
        if version != ctype.version:
            if version > ctype.version:
                raise InvalidArguments(
                    f"command {name!r} version {version} is newer than this code's "
                    f"version {ctype.version}"
                )
            step = ctype.upgrade.get(version)
            if step is None:
                raise InvalidArguments(
                    f"command {name!r} version {version} has no upgrade to version "
                    f"{ctype.version}"
                )
            try:
                fields = step(fields)
            except Exception as e:
                raise InvalidArguments(
                    f"upgrading command {name!r} from version {version} failed: "
                    f"{type(e).__name__}: {e}"
                ) from None
        try:
            return ctype.cls(**fields)
        except TypeError as e:
            raise InvalidArguments(f"fields of command {name!r} do not fit: {e}") from None

    # -- building from plain arguments (remote callers, the CLI) -------------

    def build_command(self, name: str, kwargs: Mapping[str, Any]) -> object:
        """
        Build a command from its name and plain arguments, checking names and
        types against the dataclass, as remote callers and the CLI need.
        """
        ctype = self.command_type(name)
        if not isinstance(kwargs, Mapping):
            raise InvalidArguments(f"arguments of command {name!r} must be a mapping")
        hints = _hints(ctype.cls)
        params = {
            f.name: f
            for f in dataclasses.fields(ctype.cls)
            if f.init
        }
        clean: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key not in params:
                raise InvalidArguments(
                    f"command {name!r} has no argument {key!r} "
                    f"(arguments: {', '.join(params) or 'none'})"
                )
            clean[key] = _check_type(value, hints.get(key, Any), f"{name}.{key}")
        missing = [
            f.name
            for f in params.values()
            if f.name not in clean
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise InvalidArguments(
                f"command {name!r} is missing argument(s): {', '.join(missing)}"
            )
        try:
            return ctype.cls(**clean)
        except (TypeError, ValueError) as e:
            raise InvalidArguments(f"command {name!r}: {e}") from None

    def bind_query(self, name: str, kwargs: Mapping[str, Any]) -> Callable[[Any], Any]:
        """Check a query's arguments; return a function of the model."""
        qtype = self.query_type(name)
        if not isinstance(kwargs, Mapping):
            raise InvalidArguments(f"arguments of query {name!r} must be a mapping")
        params = list(qtype.signature.parameters.values())[1:]
        by_name = {p.name: p for p in params}
        hints = _hints(qtype.func)
        clean: dict[str, Any] = {}
        for key, value in kwargs.items():
            p = by_name.get(key)
            if p is None or p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD):
                if p is None and any(q.kind is q.VAR_KEYWORD for q in params):
                    clean[key] = _check_type(value, Any, f"{name}.{key}")
                    continue
                raise InvalidArguments(
                    f"query {name!r} has no argument {key!r} "
                    f"(arguments: {', '.join(by_name) or 'none'})"
                )
            clean[key] = _check_type(value, hints.get(key, Any), f"{name}.{key}")
        missing = [
            p.name
            for p in params
            if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in clean
        ]
        if missing:
            raise InvalidArguments(f"query {name!r} is missing argument(s): {', '.join(missing)}")
        func = qtype.func
        return lambda model: func(model, **clean)

    def describe(self) -> dict[str, Any]:
        """Plain description of commands and queries, for remote callers."""

        def fmt(tp: Any) -> str:
            return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")

        commands = {}
        for name, ctype in self._commands.items():
            hints = _hints(ctype.cls)
            commands[name] = {
                "version": ctype.version,
                "fields": {f: fmt(hints.get(f, Any)) for f in ctype.field_names},
                "doc": inspect.getdoc(ctype.cls) or "",
            }
        queries = {}
        for name, qtype in self._queries.items():
            hints = _hints(qtype.func)
            queries[name] = {
                "arguments": {
                    p: fmt(hints.get(p, Any))
                    for p in list(qtype.signature.parameters)[1:]
                },
                "doc": inspect.getdoc(qtype.func) or "",
            }
        return {"schema": self.name, "commands": commands, "queries": queries}


def _encode_error(ctype: CommandType, e: Exception) -> CommandEncodeError:
    return CommandEncodeError(
        f"command {ctype.name!r} cannot be journaled: {e} (fields must be "
        f"None, bool, int, float, str, bytes, lists and dicts of these)"
    )


@functools.lru_cache(maxsize=1024)
def _hints(obj: Any) -> dict[str, Any]:
    # Cached: with postponed annotations every call compiles and evaluates
    # the annotation strings, which cost more than the rest of a remote call.
    try:
        return typing.get_type_hints(obj)
    except Exception:
        return {}


_PLAIN = (type(None), bool, int, float, str, bytes)

#: Deeper arguments are refused (which also stops cyclic ones).
MAX_DEPTH = 64


def _check_type(value: Any, tp: Any, where: str, depth: int = 0) -> Any:
    """
    Check a plain value against a (simple) annotation and return it, with an
    int widened to float where a float is wanted. Annotations this does not
    understand accept any plain value.
    """
    if depth > MAX_DEPTH:
        raise InvalidArguments(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if tp is Any or tp is object:
        return _check_plain(value, where, depth)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, where, depth)
            except InvalidArguments:
                continue
        raise InvalidArguments(f"{where}: {value!r} is not {_tpname(tp)}")
    if tp is None or tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, bytes):
        if type(value) is tp:
            return value
    elif origin in (list, list) or tp is list:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            item = args[0] if args else Any
            return [_check_type(v, item, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    elif origin in (dict, dict) or tp is dict:
        if isinstance(value, dict):
            args = typing.get_args(tp)
            kt, vt = args if len(args) == 2 else (Any, Any)
            return {
                _check_type(k, kt, f"{where} key", depth + 1): _check_type(
                    v, vt, f"{where}[{k!r}]", depth + 1
                )
                for k, v in value.items()
            }
    else:
        return _check_plain(value, where, depth)
    raise InvalidArguments(f"{where}: expected {_tpname(tp)}, got {type(value).__name__} {value!r}")


def _check_plain(value: Any, where: str, depth: int = 0) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if depth > MAX_DEPTH:
        raise InvalidArguments(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        return [_check_plain(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        return {
            _check_plain(k, where, depth + 1): _check_plain(v, where, depth + 1)
            for k, v in value.items()
        }
    raise InvalidArguments(f"{where}: {type(value).__name__} is not a plain value")


def _tpname(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")

