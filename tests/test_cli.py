"""
``python -m txjournal``: argument coercion and output (unit tests), adduser
(in process), and call/query end to end: a JournalService with a PB
listener in this process, the CLI in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol

from examples.bank import bank
from txjournal import JournalService
from txjournal.cli import (
    EXIT_CONNECT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    SUBCOMMANDS,
    UsageProblem,
    build_parser,
    coerce_arguments,
    coerce_value,
    main,
    read_password,
    to_json,
    type_options,
)
from txjournal.pb import pb_factory
from txjournal.users import load_users

ROOT = Path(__file__).resolve().parent.parent


# -- coercion -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "type_name", "expected"),
    [
        ("10", "int", 10),
        ("-3", "int", -3),
        ("2.5", "float", 2.5),
        ("2", "float", 2.0),
        ("alice", "str", "alice"),
        ("10", "str", "10"),
        ("", "str", ""),
        ("true", "bool", True),
        ("No", "bool", False),
        ("1", "bool", True),
        ("off", "bool", False),
        ("héllo", "bytes", "héllo".encode()),
        ("[1, 2]", "list[int]", [1, 2]),
        ('{"a": 1}', "dict[str, int]", {"a": 1}),
        ('{"a": 1}', "dict", {"a": 1}),
        ("[1, 2]", "Any", [1, 2]),
        ("hello", "Any", "hello"),
        ("5", "Any", 5),
        ("null", "int | None", None),
        ("5", "int | None", 5),
        ("5", "Optional[int]", 5),
        ("null", "Optional[str]", None),
        ("word", "str | None", "word"),
        ("5", "int | str", 5),
        ("5", "str | int", 5),
        ("five", "int | str", "five"),
        ("5", "Union[int, str, None]", 5),
        ("[1]", "list[int] | None", [1]),
    ],
)
def test_coerce_value(text: str, type_name: str, expected: Any) -> None:
    value = coerce_value(text, type_name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "type_name", "fragment"),
    [
        ("ten", "int", "not an integer"),
        ("1.5", "int", "not an integer"),
        ("x", "float", "not a number"),
        ("maybe", "bool", "not a boolean"),
        ("[1,", "list[int]", "not JSON"),
        ("a", "dict[str, int]", "not JSON"),
        ("ten", "int | None", "is not int | None"),
    ],
)
def test_coerce_value_errors(text: str, type_name: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        coerce_value(text, type_name)


def test_type_options() -> None:
    assert type_options("int") == ["int"]
    assert type_options("int | None") == ["int", "None"]
    assert type_options("Optional[dict[str, int]]") == ["dict[str, int]", "None"]
    assert type_options("Union[int, list[str]]") == ["int", "list[str]"]
    assert type_options("dict[str, int | None]") == ["dict[str, int | None]"]


def test_coerce_arguments() -> None:
    types = {"account": "str", "amount": "int", "tags": "list[str]"}
    assert coerce_arguments(["account=alice", "amount=10"], types) == {"account": "alice", "amount": 10}
    # key:= forces JSON whatever the declared type: here a string the server will refuse.
    assert coerce_arguments(['amount:="10"'], types) == {"amount": "10"}
    assert coerce_arguments(["account:=null"], types) == {"account": None}
    assert coerce_arguments(['tags=["a","b"]'], types) == {"tags": ["a", "b"]}
    # Values may contain '=' and ':'.
    assert coerce_arguments(["account=a=b:c"], types) == {"account": "a=b:c"}
    # Unknown keys are left to the server (queries may take **kwargs).
    assert coerce_arguments(["extra=3", "other=x"], types) == {"extra": 3, "other": "x"}
    assert coerce_arguments([], types) == {}


@pytest.mark.parametrize(
    ("words", "fragment"),
    [
        (["account"], "not key=value"),
        (["=5"], "not key=value"),
        ([":=5"], "not key=value"),
        (["amount=1", "amount=2"], "given twice"),
        (["amount=ten"], "argument 'amount' (declared int): 'ten' is not an integer"),
        (["amount:=[1,"], "is not JSON"),
    ],
)
def test_coerce_arguments_errors(words: list[str], fragment: str) -> None:
    with pytest.raises(UsageProblem) as e:
        coerce_arguments(words, {"amount": "int"})
    assert fragment in str(e.value)


def test_to_json() -> None:
    value = {"b": b"\x00\xff", "t": (1, [b"x"]), b"k": 1, "n": None, 3: 2.5}
    assert json.loads(json.dumps(to_json(value))) == {
        "b": {"$bytes": "AP8="},
        "t": [1, [{"$bytes": "eA=="}]],
        "$bytes:aw==": 1,
        "n": None,
        "3": 2.5,
    }


def test_read_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pw"
    path.write_text("  s3cret \nsecond line\n")
    assert read_password(str(path)) == "s3cret"
    monkeypatch.setattr(sys, "stdin", io.StringIO("from-stdin\n"))
    assert read_password("-") == "from-stdin"
    path.write_text("\n")
    with pytest.raises(UsageProblem, match="is empty"):
        read_password(str(path))
    with pytest.raises(UsageProblem, match="cannot read"):
        read_password(str(tmp_path / "missing"))


def test_parser_structure() -> None:
    """Subcommands come from one table, so adding one is one entry."""
    assert {"adduser", "call", "query"} <= set(SUBCOMMANDS)
    parser = build_parser()
    args = parser.parse_args(["call", "--user", "u", "--password-file", "f", "deposit", "a=1"])
    assert args._run is SUBCOMMANDS["call"].run
    assert args.connect == "tcp:127.0.0.1:8789"
    assert args.arguments == ["a=1"]
    with pytest.raises(SystemExit) as e:
        parser.parse_args([])
    assert e.value.code == EXIT_USAGE


# -- adduser ------------------------------------------------------------------------------


def test_adduser_generates_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "var" / "users"
    assert main(["adduser", "--users", str(path), "admin", "rw"]) == EXIT_OK
    out = capsys.readouterr().out
    password = out.strip().splitlines()[-1]
    assert "shown only this once" in out
    assert str(path) in out
    assert load_users(str(path))["admin"].password == password.encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_adduser_if_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "users"
    assert main(["adduser", "--users", str(path), "--if-missing", "admin", "rw"]) == EXIT_OK
    before = path.read_text()
    capsys.readouterr()
    assert main(["adduser", "--users", str(path), "--if-missing", "admin", "rw"]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "exists" in captured.err
    assert path.read_text() == before


def test_adduser_with_password_file_and_duplicate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, pw = tmp_path / "users", tmp_path / "pw"
    pw.write_text("chosen\n")
    assert main(["adduser", "--users", str(path), "--password-file", str(pw), "bob", "ro"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "chosen" not in out
    assert str(pw) in out
    assert load_users(str(path))["bob"].password == b"chosen"
    assert main(["adduser", "--users", str(path), "bob", "rw"]) == EXIT_USAGE
    assert "already exists" in capsys.readouterr().err


def test_adduser_bad_role(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["adduser", "--users", str(tmp_path / "u"), "bob", "root"])
    assert e.value.code == EXIT_USAGE


# -- call and query, end to end ------------------------------------------------------------------


class Server:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        users = tmp_path / "users"
        users.write_text("admin:admin-pw:rw\nreader:reader-pw:ro\nops:ops-pw:admin\n")
        users.chmod(0o600)
        self.users = load_users(str(users))
        for name in ("admin", "reader", "ops"):
            (tmp_path / f"{name}.pw").write_text(f"{name}-pw\n")
        (tmp_path / "bad.pw").write_text("wrong\n")
        self.service: JournalService[Any] = JournalService(bank, datadir=str(tmp_path / "data"))
        self.factory = pb_factory(self.service, self.users)
        self.lost: list[Deferred[None]] = []
        build = self.factory.buildProtocol

        def build_tracked(addr: Any) -> Any:
            broker = build(addr)
            lost: Deferred[None] = Deferred()
            broker.notifyOnDisconnect(lambda: lost.callback(None))
            self.lost.append(lost)
            return broker

        self.factory.buildProtocol = build_tracked  # type: ignore[method-assign]
        self.port: Any = None

    @property
    def connect(self) -> str:
        return f"tcp:127.0.0.1:{self.port.getHost().port}"

    async def start(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        self.service.startService()
        self.port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.factory)

    async def stop(self) -> None:
        await self.port.stopListening()
        # The CLI processes have exited; wait until this side saw it.
        await gatherResults(self.lost)
        await self.service.stopService()

    async def cli(self, *argv: str, user: str = "admin", connect: str | None = None) -> tuple[int, str, str]:
        """Run ``python -m txjournal SUBCOMMAND --connect ... --user ... ARGS``."""
        from twisted.internet.utils import getProcessOutputAndValue

        subcommand, *rest = argv
        args = [
            "-m", "txjournal", subcommand,
            "--connect", connect or self.connect,
            "--user", user,
            "--password-file", str(self.tmp_path / f"{user}.pw"),
            "--timeout", "20",
            *rest,
        ]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, args, env=dict(os.environ), path=str(ROOT)
        )
        return code, out.decode(), err.decode()


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(tmp_path)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_call_and_query(server: Server) -> None:
    code, out, err = await server.cli("call", "deposit", "account=alice", "amount=10")
    assert (code, json.loads(out)) == (EXIT_OK, 10), err
    code, out, err = await server.cli("call", "open", "account=bob")
    assert (code, json.loads(out)) == (EXIT_OK, "bob"), err
    code, out, err = await server.cli("call", "transfer", "source=alice", "target=bob", "amount:=4")
    assert (code, json.loads(out)) == (EXIT_OK, {"alice": 6, "bob": 4}), err
    code, out, err = await server.cli("query", "balance", "account=alice", user="reader")
    assert (code, json.loads(out)) == (EXIT_OK, 6), err
    code, out, err = await server.cli("query", "accounts", user="reader")
    assert (code, json.loads(out)) == (EXIT_OK, {"alice": 6, "bob": 4}), err
    assert server.service.model.accounts == {"alice": 6, "bob": 4}


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_command_error(server: Server) -> None:
    await server.cli("call", "deposit", "account=alice", "amount=10")
    code, out, err = await server.cli("call", "withdraw", "account=alice", "amount=100")
    assert code == EXIT_FAILED
    assert out == ""
    assert "InsufficientFunds" in err
    assert "alice has 10, cannot withdraw 100" in err
    assert "Traceback" not in err
    code, out, err = await server.cli("query", "balance", "account=nobody")
    assert code == EXIT_FAILED
    assert "UnknownAccount" in err
    # A read-only user is refused.
    code, out, err = await server.cli("call", "deposit", "account=alice", "amount=1", user="reader")
    assert code == EXIT_FAILED
    assert "read-only" in err
    assert server.service.model.accounts == {"alice": 10}


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_usage_errors(server: Server) -> None:
    code, out, err = await server.cli("call", "steal", "account=alice")
    assert code == EXIT_USAGE
    assert "no command named 'steal'" in err
    assert "deposit" in err  # the known ones are listed
    code, out, err = await server.cli("query", "secrets")
    assert code == EXIT_USAGE
    assert "no query named 'secrets'" in err
    code, out, err = await server.cli("call", "deposit", "account=alice", "amount=ten")
    assert code == EXIT_USAGE
    assert "'ten' is not an integer" in err
    # Forced through as JSON, the server refuses it: still a usage error.
    code, out, err = await server.cli("call", "deposit", "account=alice", 'amount:="ten"')
    assert code == EXIT_USAGE
    assert "expected int" in err
    code, out, err = await server.cli("call", "deposit", "account=alice")
    assert code == EXIT_USAGE
    assert "missing argument(s): amount" in err
    code, out, err = await server.cli("call", "deposit", "account=alice", "amount=1", "colour=red")
    assert code == EXIT_USAGE
    assert "no argument 'colour'" in err
    code, out, err = await server.cli("call", "deposit", "account")
    assert code == EXIT_USAGE
    assert "not key=value" in err
    assert server.service.engine.last_seq == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_login_and_connection_failures(server: Server, tmp_path: Path) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    code, out, err = await server.cli("call", "deposit", "account=a", "amount=1", user="bad")
    assert code == EXIT_CONNECT
    assert "refused" in err
    (tmp_path / "nobody.pw").write_text("admin-pw\n")
    code, out, err = await server.cli("query", "total", user="nobody")
    assert code == EXIT_CONNECT
    assert "unknown user or wrong password" in err
    # Nothing listens on a port that was just closed.
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
    closed = f"tcp:127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    code, out, err = await server.cli("query", "total", connect=closed)
    assert code == EXIT_CONNECT
    assert "cannot connect" in err
    code, out, err = await server.cli("query", "total", connect="nonsense:1")
    assert code == EXIT_USAGE
    assert server.service.engine.last_seq == 0


class Silent(Protocol):
    """Accepts a connection and never says anything."""

    def connectionMade(self) -> None:
        silent.append(self)


silent: list[Silent] = []


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_timeout(server: Server) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.utils import getProcessOutputAndValue

    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(Silent)
    )
    try:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "txjournal", "query", "--connect", f"tcp:127.0.0.1:{port.getHost().port}",
             "--user", "admin", "--password-file", str(server.tmp_path / "admin.pw"),
             "--timeout", "1", "total"],
            env=dict(os.environ),
            path=str(ROOT),
        )
    finally:
        await port.stopListening()
        for proto in silent:
            assert proto.transport is not None
            proto.transport.loseConnection()
        silent.clear()
    assert code == EXIT_CONNECT
    assert b"timed out after 1s while logging in" in err


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_status_and_promote_of_a_writer(server: Server) -> None:
    code, out, err = await server.cli("status", user="reader")
    assert (code, json.loads(out)) == (EXIT_OK, {"role": "writer", "last_seq": 0, "lag": None, "error": None}), err
    code, out, err = await server.cli("promote", user="admin")  # rw is not enough
    assert code == EXIT_FAILED and "admin role" in err, err
    code, out, err = await server.cli("promote", "--take-over", user="ops")
    assert code == EXIT_USAGE and "writer already" in err, err
    assert out == ""
