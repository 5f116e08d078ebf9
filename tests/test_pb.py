"""
Remote access over PB, end to end on loopback with the real reactor: a real
JournalService on a temporary directory, the factory from
``txjournal.pb.pb_factory``, and PB clients in the same process.
"""

from __future__ import annotations

import enum
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import Anonymous, IAnonymous, UsernamePassword
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, gatherResults
from twisted.spread import jelly, pb
from zope.interface.verify import verifyObject

from examples.bank import bank
from txjournal import Context, JournalService, Schema
from txjournal.journal.file import FileJournal
from txjournal.pb import (
    BasicTypesOnly,
    JournalAvatar,
    JournalPortal,
    JournalRealm,
    LoginRefused,
    PermissionDenied,
    RemoteArgumentError,
    RemoteCommandError,
    RemoteQueryError,
    ResultNotPlain,
    ServiceUnavailable,
    check_plain,
    make_portal,
    pb_factory,
    remote_error_name,
)
from txjournal.users import User, Users, UsersChecker

pytestmark = pytest.mark.timeout(30)

USERS = Users(
    {
        "alice": User("alice", b"alice-pw", "rw"),
        "reader": User("reader", b"reader-pw", "ro"),
        "ops": User("ops", b"ops-pw", "admin"),
    }
)


class Harness:
    """
    A PB listener for a service on a free loopback port, plus the clients
    a test opens, all closed (both ends) by :meth:`close`.
    """

    def __init__(self, service: JournalService[Any]) -> None:
        self.service = service
        self.factory = pb_factory(service, USERS)
        self.port: Any = None
        self._server_lost: list[Deferred[None]] = []
        self._clients: list[tuple[pb.Broker, Deferred[None]]] = []
        build = self.factory.buildProtocol

        def build_tracked(addr: Any) -> Any:
            broker = build(addr)
            lost: Deferred[None] = Deferred()
            broker.notifyOnDisconnect(lambda: lost.callback(None))
            self._server_lost.append(lost)
            return broker

        self.factory.buildProtocol = build_tracked  # type: ignore[method-assign]

    async def start(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        self.port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.factory)

    async def connect(self) -> pb.PBClientFactory:
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint

        factory = pb.PBClientFactory()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        broker: pb.Broker = await endpoint.connect(factory)  # type: ignore[assignment]
        lost: Deferred[None] = Deferred()
        broker.notifyOnDisconnect(lambda: lost.callback(None))
        self._clients.append((broker, lost))
        return factory

    async def login(self, name: str, password: str) -> pb.RemoteReference:
        factory = await self.connect()
        return await factory.login(UsernamePassword(name.encode(), password.encode()))

    async def close(self) -> None:
        for broker, _ in self._clients:
            assert broker.transport is not None
            broker.transport.loseConnection()
        await gatherResults([lost for _, lost in self._clients])
        if self.port is not None:
            await self.port.stopListening()
        await gatherResults(self._server_lost)
        if self.service.running:
            await self.service.stopService()


@pytest_twisted.async_yield_fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    harnesses: list[Harness] = []

    async def make(schema: Schema[Any] = bank, start: bool = True) -> Harness:
        service: JournalService[Any] = JournalService(
            schema, datadir=str(tmp_path / f"data{len(harnesses)}")
        )
        if start:
            service.startService()
        harness = Harness(service)
        harnesses.append(harness)
        await harness.start()
        return harness

    yield make
    for harness in harnesses:
        await harness.close()


@pytest_twisted.async_yield_fixture
async def harness(make_harness: Callable[..., Awaitable[Harness]]) -> AsyncIterator[Harness]:
    yield await make_harness()


async def remote_failure(d: Deferred[Any]) -> pb.RemoteError:
    """Await a remote call that must fail; return the error the client got."""
    try:
        result = await d
    except pb.RemoteError as e:
        return e
    raise AssertionError(f"expected a remote error, got {result!r}")


def assert_remote(e: pb.RemoteError, cls: type[BaseException], *fragments: str) -> None:
    assert e.remoteType == remote_error_name(cls), (e.remoteType, str(e))
    for fragment in fragments:
        assert fragment in str(e), (fragment, str(e))
    # unsafeTracebacks is off: the client never sees server frames.
    assert "File " not in str(e.remoteTraceback)


# -- interfaces and wiring -------------------------------------------------------


def test_interfaces(tmp_path: Path) -> None:
    service: JournalService[Any] = JournalService(bank, datadir=str(tmp_path / "d"))
    realm = JournalRealm(service, USERS)
    assert verifyObject(IRealm, realm)
    assert verifyObject(ICredentialsChecker, UsersChecker(USERS))
    portal = make_portal(service, USERS)
    assert isinstance(portal, JournalPortal)
    # No anonymous checker: anonymous logins have nothing to check them.
    assert IAnonymous not in portal.listCredentialsInterfaces()
    factory = pb_factory(service, USERS)
    assert factory.unsafeTracebacks is False
    assert isinstance(factory.security, BasicTypesOnly)
    assert isinstance(factory.security, jelly.SecurityOptions)


# -- login ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_login_and_describe(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    description = await avatar.callRemote("describe")
    assert description == bank.describe()
    assert description["commands"]["deposit"]["fields"] == {"account": "str", "amount": "int"}


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_unknown_user_look_alike(harness: Harness) -> None:
    factory = await harness.connect()
    wrong = await remote_failure(factory.login(UsernamePassword(b"alice", b"nope")))
    assert_remote(wrong, LoginRefused, "login refused")
    factory = await harness.connect()
    unknown = await remote_failure(factory.login(UsernamePassword(b"mallory", b"alice-pw")))
    assert_remote(unknown, LoginRefused)
    assert str(wrong) == str(unknown)
    # LoginRefused is an UnauthorizedLogin, so generic cred-aware clients
    # checking for that still recognise it.
    assert issubclass(LoginRefused, pb.Error)
    from twisted.cred.error import UnauthorizedLogin

    assert issubclass(LoginRefused, UnauthorizedLogin)


@pytest_twisted.ensureDeferred
async def test_anonymous_login_refused(harness: Harness) -> None:
    factory = await harness.connect()
    e = await remote_failure(factory.login(Anonymous()))
    assert_remote(e, LoginRefused, "anonymous")


@pytest_twisted.ensureDeferred
async def test_login_before_ready_fails_cleanly(make_harness: Callable[..., Awaitable[Harness]]) -> None:
    """
    Under twistd the port listens before the journal has replayed: logins in
    that window get a clear error, not an avatar.
    """
    harness = await make_harness(start=False)
    factory = await harness.connect()
    e = await remote_failure(factory.login(UsernamePassword(b"alice", b"alice-pw")))
    assert_remote(e, ServiceUnavailable, "not running")
    # Wrong passwords are still refused as such.
    factory = await harness.connect()
    e = await remote_failure(factory.login(UsernamePassword(b"alice", b"x")))
    assert_remote(e, LoginRefused)
    harness.service.startService()
    avatar = await harness.login("alice", "alice-pw")
    assert await avatar.callRemote("execute", "deposit", {"account": "a", "amount": 1}) == 1


@pytest_twisted.ensureDeferred
async def test_calls_after_stop_are_refused(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    await harness.service.stopService()
    e = await remote_failure(avatar.callRemote("execute", "deposit", {"account": "a", "amount": 1}))
    assert_remote(e, ServiceUnavailable, "not running")
    e = await remote_failure(avatar.callRemote("query", "total", {}))
    assert_remote(e, ServiceUnavailable)
    e = await remote_failure(avatar.callRemote("execute_many", [["deposit", {"account": "a", "amount": 1}]]))
    assert_remote(e, ServiceUnavailable)


# -- commands and queries -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rw_executes_and_queries(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    assert await avatar.callRemote("execute", "deposit", {"account": "alice", "amount": 10}) == 10
    assert await avatar.callRemote("execute", "open", {"account": "bob"}) == "bob"
    result = await avatar.callRemote(
        "execute", "transfer", {"source": "alice", "target": "bob", "amount": 4}
    )
    assert result == {"alice": 6, "bob": 4}
    assert await avatar.callRemote("query", "balance", {"account": "alice"}) == 6
    assert await avatar.callRemote("query", "accounts") == {"alice": 6, "bob": 4}
    # The journal records who executed each command.
    datadir = harness.service.datadir
    assert datadir is not None
    await harness.service.stopService()
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    try:
        records = list(journal.replay(1))
    finally:
        journal.close()
    assert [(r.seq, r.name, r.user) for r in records] == [
        (1, "deposit", "alice"), (2, "open", "alice"), (3, "transfer", "alice"),
    ]


@pytest_twisted.ensureDeferred
async def test_ro_queries_but_cannot_execute(harness: Harness) -> None:
    writer = await harness.login("alice", "alice-pw")
    await writer.callRemote("execute", "deposit", {"account": "alice", "amount": 5})
    reader = await harness.login("reader", "reader-pw")
    assert await reader.callRemote("query", "balance", {"account": "alice"}) == 5
    assert (await reader.callRemote("describe"))["schema"] == "bank"
    seq = harness.service.engine.last_seq
    e = await remote_failure(reader.callRemote("execute", "deposit", {"account": "alice", "amount": 5}))
    assert_remote(e, PermissionDenied, "'reader'", "read-only")
    e = await remote_failure(
        reader.callRemote("execute_many", [["deposit", {"account": "alice", "amount": 5}]])
    )
    assert_remote(e, PermissionDenied)
    assert harness.service.engine.last_seq == seq
    assert harness.service.model.accounts == {"alice": 5}


@pytest_twisted.ensureDeferred
async def test_unknown_command_and_query(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    e = await remote_failure(avatar.callRemote("execute", "steal", {"account": "x"}))
    assert_remote(e, RemoteArgumentError, "no command named 'steal'", "deposit")
    e = await remote_failure(avatar.callRemote("query", "secrets", {}))
    assert_remote(e, RemoteArgumentError, "no query named 'secrets'", "balance")
    assert harness.service.engine.last_seq == 0


@pytest.mark.parametrize(
    ("name", "kwargs", "fragments"),
    [
        ("deposit", {"account": "a"}, ["missing argument(s): amount"]),
        ("deposit", {"account": "a", "amount": 1, "colour": "red"}, ["no argument 'colour'"]),
        ("deposit", {"account": "a", "amount": "ten"}, ["deposit.amount", "expected int", "'ten'"]),
        ("deposit", {"account": "a", "amount": 1.5}, ["expected int"]),
        ("deposit", {"account": "a", "amount": True}, ["expected int"]),
        ("deposit", {"account": 7, "amount": 1}, ["expected str"]),
        ("deposit", ["a", 1], ["must be a dict"]),
        ("deposit", {1: "a"}, ["argument names", "must be strings"]),
        (42, {}, ["name must be a non-empty string"]),
        ("", {}, ["name must be a non-empty string"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_arguments(harness: Harness, name: Any, kwargs: Any, fragments: list[str]) -> None:
    avatar = await harness.login("alice", "alice-pw")
    e = await remote_failure(avatar.callRemote("execute", name, kwargs))
    assert_remote(e, RemoteArgumentError, *fragments)
    assert harness.service.engine.last_seq == 0  # nothing was journaled


@pytest_twisted.ensureDeferred
async def test_bad_query_arguments(harness: Harness) -> None:
    avatar = await harness.login("reader", "reader-pw")
    e = await remote_failure(avatar.callRemote("query", "balance", {}))
    assert_remote(e, RemoteArgumentError, "missing argument(s): account")
    e = await remote_failure(avatar.callRemote("query", "balance", {"account": 3}))
    assert_remote(e, RemoteArgumentError, "expected str")


@pytest_twisted.ensureDeferred
async def test_command_that_raises(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    await avatar.callRemote("execute", "deposit", {"account": "alice", "amount": 10})
    e = await remote_failure(avatar.callRemote("execute", "withdraw", {"account": "alice", "amount": 50}))
    assert_remote(
        e, RemoteCommandError, "command 'withdraw' failed", "InsufficientFunds",
        "alice has 10, cannot withdraw 50",
    )
    # The rejected command is journaled (part of history) but changed nothing.
    assert harness.service.engine.last_seq == 2
    assert await avatar.callRemote("query", "balance", {"account": "alice"}) == 10
    # And the service keeps serving, on the same connection.
    assert await avatar.callRemote("execute", "withdraw", {"account": "alice", "amount": 3}) == 7


@pytest_twisted.ensureDeferred
async def test_query_that_raises(harness: Harness) -> None:
    avatar = await harness.login("reader", "reader-pw")
    e = await remote_failure(avatar.callRemote("query", "balance", {"account": "nobody"}))
    assert_remote(e, RemoteQueryError, "query 'balance' failed", "UnknownAccount", "nobody")


@pytest_twisted.ensureDeferred
async def test_execute_many_mixed_outcomes(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    outcomes = await avatar.callRemote(
        "execute_many",
        [
            ["deposit", {"account": "alice", "amount": 10}],
            ["withdraw", {"account": "alice", "amount": 100}],
            ["steal", {}],
            ("deposit", {"account": "alice", "amount": "ten"}),
            ["deposit", {"account": "alice", "amount": 5}],
        ],
    )
    assert outcomes[0] == {"ok": 10}
    assert outcomes[1]["error"]["type"] == "InsufficientFunds"
    assert outcomes[1]["error"]["kind"] == "RemoteCommandError"
    assert "cannot withdraw 100" in outcomes[1]["error"]["message"]
    assert outcomes[2]["error"]["type"] == "UnknownCommand"
    assert outcomes[2]["error"]["kind"] == "RemoteArgumentError"
    assert outcomes[3]["error"]["type"] == "InvalidArguments"
    assert outcomes[4] == {"ok": 15}
    assert len(outcomes) == 5
    # Three reached the journal (two applied, one rejected by the model).
    assert harness.service.engine.last_seq == 3
    assert await avatar.callRemote("execute_many", []) == []


@pytest.mark.parametrize(
    ("calls", "fragment"),
    [
        ("deposit", "list of [name, kwargs] pairs"),
        ([["deposit", {"account": "a", "amount": 1}], ["deposit"]], "call 1 is not a [name, kwargs] pair"),
        ([["deposit", {"account": "a", "amount": 1}], [7, {}]], "call 1"),
        ([["deposit", {"account": "a", "amount": 1}], ["deposit", "x"]], "must be a dict"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_execute_many_malformed_runs_nothing(harness: Harness, calls: Any, fragment: str) -> None:
    avatar = await harness.login("alice", "alice-pw")
    e = await remote_failure(avatar.callRemote("execute_many", calls))
    assert_remote(e, RemoteArgumentError, fragment)
    assert harness.service.engine.last_seq == 0


@pytest_twisted.ensureDeferred
async def test_execute_many_is_pipelined(harness: Harness) -> None:
    """All commands are submitted before any is waited for: they share syncs."""
    avatar = await harness.login("alice", "alice-pw")
    engine = harness.service.engine
    batches = engine.batches
    calls = [["deposit", {"account": "a", "amount": 1}] for _ in range(200)]
    outcomes = await avatar.callRemote("execute_many", calls)
    assert outcomes == [{"ok": i} for i in range(1, 201)]
    # One at a time would take 200 batches; group commit needs a handful.
    assert engine.batches - batches < 200


# -- no tracebacks, no classes ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unexpected_errors_carry_no_traceback(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    e = await remote_failure(avatar.callRemote("no_such_method"))
    assert e.remoteTraceback == "Traceback unavailable\n"
    assert_remote(e, RemoteArgumentError, "no_such_method")
    # Wrong arity is a TypeError inside PB: a short pb.Error, no traceback.
    e = await remote_failure(avatar.callRemote("execute", "deposit", {}, "extra", "args"))
    assert_remote(e, RemoteArgumentError, "TypeError")
    assert e.remoteTraceback == "Traceback unavailable\n"
    # The connection is still good.
    assert await avatar.callRemote("query", "total", {}) == 0


instantiated: list[Any] = []


class Sneaky(pb.Copyable):
    """A class a client might send, hoping the server builds it."""

    def __init__(self) -> None:
        self.payload = "rm -rf /"


class SneakyCopy(pb.RemoteCopy):
    """Records every time it is built (by PB, or by plain jelly)."""

    def setCopyableState(self, state: dict[str, Any]) -> None:
        instantiated.append(state)
        self.__dict__.update(state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.setCopyableState(state)


@pytest.fixture
def sneaky_registered() -> Any:
    """
    Register Sneaky's RemoteCopy process-wide, as a client library (or any
    module the server imports) would. The stock SecurityOptions then lets
    the server build it; BasicTypesOnly must not.
    """
    key = jelly.qual(Sneaky).encode()
    pb.setUnjellyableForClass(Sneaky, SneakyCopy)
    instantiated.clear()
    yield
    registry: dict[Any, Any] = jelly.unjellyableRegistry
    registry.pop(key, None)
    instantiated.clear()


def test_stock_security_would_build_registered_classes(sneaky_registered: Any) -> None:
    """Why pb_factory does not use a stock SecurityOptions (the gotcha itself)."""
    stock = jelly.SecurityOptions()
    stock.allowBasicTypes()
    built = jelly.unjelly(jelly.jelly(Sneaky()), stock)
    assert isinstance(built, SneakyCopy)
    assert len(instantiated) == 1
    instantiated.clear()
    with pytest.raises(jelly.InsecureJelly):
        jelly.unjelly(jelly.jelly(Sneaky()), BasicTypesOnly())
    # The failure type Twisted itself registers is refused too.
    with pytest.raises(jelly.InsecureJelly):
        jelly.unjelly([b"twisted.spread.pb.CopyableFailure", {}], BasicTypesOnly())
    assert instantiated == []


def test_basic_types_still_unjelly() -> None:
    value = {"a": [1, 2.5, None, True, "x", b"y", (1, 2)], "b": {"c": []}}
    assert jelly.unjelly(jelly.jelly(value), BasicTypesOnly()) == value
    for not_plain in ({1, 2}, frozenset({1})):
        with pytest.raises(jelly.InsecureJelly):
            jelly.unjelly(jelly.jelly(not_plain), BasicTypesOnly())


@pytest_twisted.ensureDeferred
async def test_client_classes_are_refused(harness: Harness, sneaky_registered: Any) -> None:
    avatar = await harness.login("alice", "alice-pw")
    e = await remote_failure(avatar.callRemote("execute", "deposit", {"account": Sneaky(), "amount": 1}))
    assert_remote(e, RemoteArgumentError, "InsecureJelly")
    e = await remote_failure(avatar.callRemote("query", Sneaky(), {}))
    assert_remote(e, RemoteArgumentError, "InsecureJelly")
    assert instantiated == []
    assert harness.service.engine.last_seq == 0
    # Sets are not plain either; the connection survives all of it.
    e = await remote_failure(avatar.callRemote("execute", "deposit", {"account": "a", "amount": {1}}))
    assert_remote(e, RemoteArgumentError, "InsecureJelly")
    assert await avatar.callRemote("execute", "deposit", {"account": "a", "amount": 1}) == 1


@pytest_twisted.ensureDeferred
async def test_cyclic_arguments_are_refused(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    cycle: list[Any] = []
    cycle.append(cycle)
    e = await remote_failure(avatar.callRemote("execute", "deposit", {"account": "a", "amount": cycle}))
    assert_remote(e, RemoteArgumentError, "repeats a list or dict by reference")
    assert harness.service.engine.last_seq == 0


# -- results that are not plain ------------------------------------------------------------


class Colour(enum.StrEnum):
    RED = "red"


odd: Schema[dict[str, Any]] = Schema("odd", model=dict)


@odd.command("remember")
@dataclass
class Remember:
    key: str

    def execute(self, model: dict[str, Any], ctx: Context) -> Any:
        model[self.key] = ctx.seq
        return {self.key} if self.key == "set" else Colour.RED


@odd.query("thing")
def thing(model: dict[str, Any]) -> Any:
    return object()


@odd.query("count")
def count(model: dict[str, Any]) -> int:
    return len(model)


@pytest_twisted.ensureDeferred
async def test_results_must_be_plain(make_harness: Callable[..., Awaitable[Harness]]) -> None:
    harness = await make_harness(odd)
    avatar = await harness.login("alice", "alice-pw")
    e = await remote_failure(avatar.callRemote("execute", "remember", {"key": "set"}))
    assert_remote(e, ResultNotPlain, "the result is a set", "was applied")
    e = await remote_failure(avatar.callRemote("execute", "remember", {"key": "enum"}))
    assert_remote(e, ResultNotPlain, "is a Colour")
    # Both commands were applied: only their results were lost.
    assert await avatar.callRemote("query", "count", {}) == 2
    e = await remote_failure(avatar.callRemote("query", "thing", {}))
    assert_remote(e, ResultNotPlain, "is a object")
    outcomes = await avatar.callRemote("execute_many", [["remember", {"key": "set"}]])
    assert outcomes[0]["error"]["kind"] == "ResultNotPlain"


def test_check_plain() -> None:
    check_plain({"a": [1, 2.0, None, True, "s", b"b", (1,)], 3: {}})
    with pytest.raises(ValueError, match=r"value\['a'\]\[1\] is a set"):
        check_plain({"a": [1, {2}]})
    with pytest.raises(ValueError, match="key"):
        check_plain({(1, object()): 1})
    deep: Any = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):
        check_plain(deep)
    shared: Any = [1]
    for _ in range(25):  # 2**25 leaves from 25 small lists
        shared = [shared, shared]
    with pytest.raises(ValueError, match="more than"):
        check_plain(shared)


def test_check_plain_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.spread import banana

    monkeypatch.setattr(banana, "SIZE_LIMIT", 100)
    check_plain("x" * 100)
    with pytest.raises(ValueError, match="longer than PB's limit"):
        check_plain("é" * 60)  # 120 bytes of UTF-8
    with pytest.raises(ValueError, match="longer than PB's limit"):
        check_plain(b"x" * 101)
    with pytest.raises(ValueError, match="more than PB's limit"):
        check_plain(list(range(100)))


def test_avatar_repr() -> None:
    assert "alice" in repr(JournalAvatar(None, "alice", "rw"))  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_malformed_calls_log_one_line_not_a_traceback(harness: Harness) -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        avatar = await harness.login("alice", "alice-pw")
        for _ in range(3):
            await remote_failure(avatar.callRemote("x" * 1000))
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) for e in events)
    assert "Traceback" not in text and "Peer will receive" not in text
    assert text.count("Refused a malformed PB call") == 3
    assert len(text) < 3000


@pytest_twisted.ensureDeferred
async def test_arguments_repeating_a_list_by_reference_are_refused(harness: Harness) -> None:
    avatar = await harness.login("alice", "alice-pw")
    shared = [1, 2]
    e = await remote_failure(
        avatar.callRemote("execute", "deposit", {"account": "a", "amount": [shared, shared]})
    )
    assert_remote(e, RemoteArgumentError, "repeats a list or dict by reference")
    assert harness.service.engine.last_seq == 0
