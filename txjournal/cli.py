"""
``python -m txjournal``: operator tools.

::

    python -m txjournal adduser --users var/users admin rw
    python -m txjournal call  --user admin --password-file pw deposit account=alice amount=10
    python -m txjournal query --user admin --password-file pw balance account=alice

``call`` and ``query`` connect to a running ``twistd journal`` over
Perspective Broker (``--connect``, any client endpoint string; default
``tcp:127.0.0.1:8789``), ask the server to ``describe`` its schema, and turn
each ``key=value`` argument into the declared type of that field:

* ``int``, ``float``, ``str``: as written; ``bool``: ``true``/``false``,
  ``yes``/``no``, ``on``/``off``, ``1``/``0``; ``bytes``: the UTF-8 bytes
  of the text;
* ``X | None``: ``null`` means ``None``, anything else is read as ``X``;
* lists, dicts and anything else: JSON; for ``Any`` a value that is not
  JSON is taken as a string;
* ``key:=<json>`` takes the value as JSON whatever the declared type.

The result is printed on stdout as JSON. JSON has no bytes, so a ``bytes``
value is printed as ``{"$bytes": "<base64>"}`` and a ``bytes`` dict key as
the string ``"$bytes:<base64>"``; tuples become lists.

Exit status: 0 success; 1 the command or query failed, or the server
refused it (role, not running, overloaded); 2 a usage error, including an
unknown command or query and arguments the server rejects (nothing was
written); 3 the connection or the login failed. If a call times out or the
connection drops while a command is in flight (exit 1), the command may or
may not have been executed.

Subcommands are entries of :data:`SUBCOMMANDS`: adding one is a function
that configures its parser, a function that runs it, and one dict entry.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from txjournal import history_cli, stats_cli, tools_cli
from txjournal.errors import TxJournalError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3

DEFAULT_CONNECT = "tcp:127.0.0.1:8789"
DEFAULT_TIMEOUT = 30.0


class UsageProblem(Exception):
    """Something wrong with what was typed; exit status 2."""


class RemoteProblem(Exception):
    """
    The remote side refused or failed the call.

    :ivar code: the exit status to use.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _error(message: str) -> None:
    print(f"txjournal: error: {message}", file=sys.stderr)


# -- adduser ----------------------------------------------------------------------


def _configure_adduser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", required=True, metavar="FILE", help="the users file (created with mode 0600)")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing if the users file already exists (for 'make run' and provisioning scripts)",
    )
    parser.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the password from the first line of FILE ('-': stdin) instead of generating one",
    )
    parser.add_argument("name", help="user name")
    parser.add_argument(
        "role", choices=["rw", "ro", "admin"],
        help="rw: commands and queries; ro: queries only; admin: rw plus promoting a replica",
    )


def _run_adduser(args: argparse.Namespace) -> int:
    from txjournal.users import add_user

    path = os.path.abspath(args.users)
    if args.if_missing and os.path.lexists(path):
        print(f"users file {path} exists; not adding {args.name!r} (--if-missing)", file=sys.stderr)
        return EXIT_OK
    password = read_password(args.password_file) if args.password_file else None
    try:
        generated = add_user(path, args.name, args.role, password)
    except TxJournalError as e:
        _error(str(e))
        return EXIT_USAGE
    if password is None:
        print(f"Added user {args.name!r} with role {args.role} to {path}.")
        print(f"Generated password (shown only this once; it is also stored in {path}):")
        print(generated)
    else:
        print(
            f"Added user {args.name!r} with role {args.role} to {path}, with the password "
            f"from {'stdin' if args.password_file == '-' else os.path.abspath(args.password_file)}."
        )
    return EXIT_OK


def read_password(path: str) -> str:
    """
    The first line of ``path`` (``-``: stdin), without surrounding whitespace.

    :raises UsageProblem: if it cannot be read or is empty.
    """
    try:
        if path == "-":
            line = sys.stdin.readline()
        else:
            with open(path, encoding="utf-8") as f:
                line = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageProblem(f"cannot read the password file {path}: {e}") from None
    password = line.strip()
    if not password:
        raise UsageProblem(f"the password file {path} is empty")
    return password


# -- argument coercion ------------------------------------------------------------

_NONE_NAMES = frozenset({"None", "NoneType"})
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split ``text`` at ``sep`` outside square brackets."""
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(text):
        c = text[i]
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i].strip())
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(text[start:].strip())
    return parts


def type_options(type_name: str) -> list[str]:
    """
    The alternatives of a type as :meth:`Schema.describe` spells it:
    ``"int | None"``, ``"Optional[int]"`` and ``"Union[int, None]"`` all give
    ``["int", "None"]``; a simple type gives itself.
    """
    name = type_name.strip()
    if name.startswith("Optional[") and name.endswith("]"):
        return [*type_options(name[len("Optional["):-1]), "None"]
    if name.startswith("Union[") and name.endswith("]"):
        return [o for part in _split_top_level(name[len("Union["):-1], ",") for o in type_options(part)]
    parts = _split_top_level(name, "|")
    if len(parts) > 1:
        return [o for part in parts for o in type_options(part)]
    return [name]


def _base(type_name: str) -> str:
    return type_name.split("[", 1)[0].strip()


def _coerce_one(text: str, type_name: str) -> Any:
    """Read ``text`` as ``type_name``; raise :class:`ValueError` if it is not one."""
    base = _base(type_name)
    if base == "str":
        return text
    if base == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if base == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if base == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
    if base == "bytes":
        return text.encode("utf-8")
    if base in _NONE_NAMES:
        if text.strip() == "null":
            return None
        raise ValueError(f"{text!r} is not null")
    try:
        value = json.loads(text)
    except ValueError:
        if base in ("list", "List", "tuple", "Tuple", "dict", "Dict", "Sequence", "Mapping"):
            raise ValueError(f"{text!r} is not JSON (a {type_name} is written as JSON)") from None
        return text  # Any, object, or an annotation we do not know: the string
    return value


def coerce_value(text: str, type_name: str) -> Any:
    """
    Read the command-line text ``text`` as a value of the declared type.

    For a union, ``null`` is ``None`` if ``None`` is allowed, and the other
    alternatives are tried with ``str`` last, so ``"5"`` for ``int | str``
    is ``5``.

    :raises ValueError: saying what was expected.
    """
    options = type_options(type_name)
    if len(options) == 1:
        return _coerce_one(text, options[0])
    if text.strip() == "null" and any(o in _NONE_NAMES for o in options):
        return None
    candidates = [o for o in options if o not in _NONE_NAMES]
    candidates.sort(key=lambda o: _base(o) == "str")
    for option in candidates:
        try:
            return _coerce_one(text, option)
        except ValueError:
            continue
    raise ValueError(f"{text!r} is not {type_name}")


def coerce_arguments(pairs: Sequence[str], types: Mapping[str, str]) -> dict[str, Any]:
    """
    Turn ``key=value`` / ``key:=json`` words into keyword arguments.

    :param types: declared type of each argument, as :meth:`Schema.describe`
        gives it; a key not in it is read like ``Any`` (the server decides
        whether it is allowed).
    :raises UsageProblem: for a malformed word, a repeated key or a value
        that does not fit its type.
    """
    result: dict[str, Any] = {}
    for word in pairs:
        key, sep, text = word.partition("=")
        if not sep or not key or key == ":":
            raise UsageProblem(f"argument {word!r} is not key=value or key:=<json>")
        as_json = key.endswith(":")
        if as_json:
            key = key[:-1]
        if key in result:
            raise UsageProblem(f"argument {key!r} is given twice")
        if as_json:
            try:
                result[key] = json.loads(text)
            except ValueError as e:
                raise UsageProblem(f"argument {key!r}: {text!r} is not JSON ({e})") from None
            continue
        type_name = types.get(key, "Any")
        try:
            result[key] = coerce_value(text, type_name)
        except ValueError as e:
            raise UsageProblem(f"argument {key!r} (declared {type_name}): {e}") from None
    return result


def to_json(value: Any) -> Any:
    """A JSON-ready copy of a plain result (see the module docstring for bytes)."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {
            ("$bytes:" + base64.b64encode(k).decode("ascii") if isinstance(k, bytes) else k): to_json(v)
            for k, v in value.items()
        }
    return value


# -- call and query ---------------------------------------------------------------


def _configure_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connect",
        default=DEFAULT_CONNECT,
        metavar="ENDPOINT",
        help=f"client endpoint of the server, e.g. tcp:HOST:PORT, unix:PATH, tls:HOST:PORT "
        f"(default {DEFAULT_CONNECT})",
    )
    parser.add_argument("--user", required=True, help="user name from the server's users file")
    parser.add_argument(
        "--password-file",
        required=True,
        metavar="FILE",
        help="file whose first line is the password ('-': read it from stdin)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default {DEFAULT_TIMEOUT:g})",
    )


def _configure_remote(parser: argparse.ArgumentParser, what: str) -> None:
    _configure_connection(parser)
    parser.add_argument("name", help=f"the {what} to run")
    parser.add_argument(
        "arguments",
        nargs="*",
        metavar="key=value",
        help="arguments, converted to the declared types; key:=<json> passes JSON",
    )


def _configure_call(parser: argparse.ArgumentParser) -> None:
    _configure_remote(parser, "command")


def _configure_query(parser: argparse.ArgumentParser) -> None:
    _configure_remote(parser, "query")


def _configure_promote(parser: argparse.ArgumentParser) -> None:
    _configure_connection(parser)
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="if the writer is still alive (hung, partitioned), fence it and end its "
        "database session instead of refusing",
    )


def _run_promote(args: argparse.Namespace) -> int:
    return _run_remote(args, "promote")


def _run_status(args: argparse.Namespace) -> int:
    return _run_remote(args, "status")


def _run_call(args: argparse.Namespace) -> int:
    return _run_remote(args, "command")


def _run_query(args: argparse.Namespace) -> int:
    return _run_remote(args, "query")


def _run_remote(args: argparse.Namespace, kind: str) -> int:
    try:
        password = read_password(args.password_file)
    except UsageProblem as e:
        _error(str(e))
        return EXIT_USAGE
    if not args.timeout > 0:
        _error("--timeout must be positive")
        return EXIT_USAGE
    from twisted.internet.task import react

    async def main(reactor: Any) -> NoReturn:
        raise SystemExit(await _remote_session(reactor, args, kind, password))

    try:
        react(main)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED
    return EXIT_OK  # pragma: no cover (react always exits)


async def _remote_session(reactor: Any, args: argparse.Namespace, kind: str, password: str) -> int:
    """Connect, log in, describe, call; print the result. Returns the exit status."""
    from twisted.internet.defer import CancelledError, ensureDeferred
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    phase = ["connecting to " + args.connect]
    d = ensureDeferred(_remote_call(reactor, args, kind, password, phase))
    d.addTimeout(args.timeout, reactor)
    try:
        result = await d
    except UsageProblem as e:
        _error(str(e))
        return EXIT_USAGE
    except RemoteProblem as e:
        _error(str(e))
        return e.code
    except (DeferredTimeout, CancelledError):
        sent = phase[0].startswith("waiting for the ")
        _error(
            f"timed out after {args.timeout:g}s while {phase[0]}"
            + ("; it may or may not have been executed" if sent and kind == "command" else "")
            + ("; the replica may or may not have been promoted" if sent and kind == "promote" else "")
        )
        return EXIT_FAILED if sent else EXIT_CONNECT
    except Exception as e:
        # A bug or something unforeseen: say what, without a traceback wall.
        _error(f"unexpected error while {phase[0]}: {type(e).__name__}: {e}")
        return EXIT_FAILED
    try:
        text = json.dumps(to_json(result))
    except (TypeError, ValueError) as e:
        _error(f"the result cannot be shown as JSON: {e}: {result!r}")
        return EXIT_FAILED
    print(text)
    return EXIT_OK


def _remote_type(e: Exception) -> bytes:
    remote_type = getattr(e, "remoteType", b"")
    return remote_type.encode() if isinstance(remote_type, str) else remote_type


async def _remote_call(
    reactor: Any, args: argparse.Namespace, kind: str, password: str, phase: list[str]
) -> Any:
    from twisted.cred.credentials import UsernamePassword
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.error import ConnectError, ConnectionClosed
    from twisted.spread import pb

    from txjournal.pb import (
        LoginRefused,
        PermissionDenied,
        RemoteArgumentError,
        ServiceUnavailable,
        remote_error_name,
    )

    try:
        endpoint = clientFromString(reactor, args.connect)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageProblem(f"--connect {args.connect!r} is not a client endpoint: {e}") from None
    factory = pb.PBClientFactory()
    try:
        try:
            await endpoint.connect(factory)
            phase[0] = f"logging in as {args.user!r}"
            avatar = await factory.login(
                UsernamePassword(args.user.encode("utf-8"), password.encode("utf-8"))
            )
        except pb.RemoteError as e:
            if _remote_type(e) in (
                remote_error_name(LoginRefused),
                b"twisted.cred.error.UnauthorizedLogin",
            ):
                raise RemoteProblem(
                    f"login as {args.user!r} refused: unknown user or wrong password", EXIT_CONNECT
                ) from None
            raise RemoteProblem(f"login as {args.user!r} failed: {e}", EXIT_CONNECT) from None
        except (ConnectError, ConnectionClosed, pb.PBConnectionLost, OSError) as e:
            raise RemoteProblem(f"cannot connect to {args.connect}: {e}", EXIT_CONNECT) from None

        try:
            if kind == "status":
                phase[0] = "asking for the server's status"
                return await avatar.callRemote("status")
            if kind == "promote":
                phase[0] = "waiting for the promotion"
                return await avatar.callRemote("promote", bool(args.take_over))
            phase[0] = "asking the server to describe its schema"
            description = await avatar.callRemote("describe")
            section = description["commands" if kind == "command" else "queries"]
            if args.name not in section:
                known = ", ".join(sorted(section)) or "none"
                raise UsageProblem(
                    f"schema {description['schema']!r} has no {kind} named {args.name!r} "
                    f"(known: {known})"
                )
            declared = section[args.name]["fields" if kind == "command" else "arguments"]
            kwargs = coerce_arguments(args.arguments, declared)
            phase[0] = f"waiting for the {kind} {args.name!r}"
            return await avatar.callRemote("execute" if kind == "command" else "query", args.name, kwargs)
        except pb.RemoteError as e:
            remote_type = _remote_type(e)
            if remote_type == remote_error_name(RemoteArgumentError):
                raise RemoteProblem(str(e), EXIT_USAGE) from None
            if remote_type in (remote_error_name(PermissionDenied), remote_error_name(ServiceUnavailable)):
                raise RemoteProblem(str(e), EXIT_FAILED) from None
            raise RemoteProblem(str(e), EXIT_FAILED) from None
        except (ConnectionClosed, pb.PBConnectionLost) as e:
            unknown = {
                "command": "; it may or may not have been executed",
                "promote": "; the replica may or may not have been promoted (ask with 'status')",
            }.get(kind, "")
            raise RemoteProblem(f"lost the connection while {phase[0]}{unknown}: {e}", EXIT_FAILED) from None
    finally:
        factory.disconnect()


# -- the program ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """
    One ``python -m txjournal`` subcommand.

    :ivar configure: adds the subcommand's arguments to its parser.
    :ivar run: runs it; returns the exit status.
    """

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Every subcommand by name. Adding one is one entry here.
SUBCOMMANDS: dict[str, Subcommand] = {
    "adduser": Subcommand("add a user to a users file", _configure_adduser, _run_adduser),
    "call": Subcommand("execute a command on a running server", _configure_call, _run_call),
    "query": Subcommand("run a query on a running server", _configure_query, _run_query),
    "status": Subcommand(
        "show whether a running server is the writer or a replica, and its lag",
        _configure_connection,
        _run_status,
    ),
    "promote": Subcommand(
        "turn a running replica into the writer (needs the admin role)", _configure_promote, _run_promote
    ),
    "verify": Subcommand(
        "check a journal (a data directory, or an SQL journal by URL) and its snapshots",
        tools_cli.configure_verify,
        tools_cli.run_verify,
    ),
    "inspect": Subcommand(
        "list journal records (no application code needed)", tools_cli.configure_inspect, tools_cli.run_inspect
    ),
    "repair": Subcommand(
        "cut a damaged journal after a sequence number, keeping a backup",
        tools_cli.configure_repair,
        tools_cli.run_repair,
    ),
    "check": Subcommand(
        "replay the journal with the current code and compare with every snapshot",
        history_cli.configure_check,
        history_cli.run_check,
    ),
    "rebuild": Subcommand(
        "replay the whole journal with the current code and write a new snapshot",
        history_cli.configure_rebuild,
        history_cli.run_rebuild,
    ),
    "replay": Subcommand(
        "rebuild the model as of a point in history (in memory) to query, explore or time it",
        history_cli.configure_replay,
        history_cli.run_replay,
    ),
    "stats": Subcommand(*stats_cli.SUBCOMMAND),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="python -m txjournal",
        description="txjournal operator tools",
        epilog="Exit status: 0 ok, 1 failed or refused, 2 usage error, 3 connection or login failed.",
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.help, description=command.help)
        command.configure(sub_parser)
        sub_parser.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m txjournal`` with ``argv``; return the exit status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    return run(args)
