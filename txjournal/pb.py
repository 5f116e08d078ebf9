"""
Remote access over Perspective Broker.

A client logs in through ``twisted.cred`` (users from a users file, see
:mod:`txjournal.users`) and gets a :class:`JournalAvatar` with four remote
methods::

    execute(name, kwargs)        -> result of the command   (role rw only)
    execute_many([[name, kwargs], ...])
                                 -> [{"ok": result} | {"error": {...}}, ...]
    query(name, kwargs)          -> result of the query
    describe()                   -> the schema's commands and queries

Arguments and results are *plain values* only: ``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes`` and lists, tuples and dicts of these. The
server's jelly security accepts nothing else, so no client-supplied class is
ever instantiated on the server (see :class:`BasicTypesOnly` for why a stock
:class:`~twisted.spread.jelly.SecurityOptions` is not enough).

Every expected failure reaches the client as a :class:`pb.Error` subclass
with a clear message, never as a traceback:

* :class:`RemoteCommandError`: the command raised (e.g. an overdraft). The
  command **is in the journal**; it is part of history and replay fails it
  the same way. Commands check before they mutate, so the model is unchanged.
* :class:`RemoteQueryError`: the query raised.
* :class:`RemoteArgumentError`: unknown command or query, arguments that do
  not fit, or fields that cannot be journaled. Nothing was written.
* :class:`PermissionDenied`: a read-only user tried to execute.
* :class:`ServiceUnavailable`: the service is starting, stopping, overloaded
  or stopped after a write error. For a write error the outcome of the
  commands in flight is unknown.
* :class:`ResultNotPlain`: the result cannot be sent. For a command this
  means it *was* applied; only its result is lost.
* :class:`LoginRefused`: unknown user, wrong password or anonymous login.
  It subclasses :class:`~twisted.cred.error.UnauthorizedLogin` as well, so
  ``failure.check(UnauthorizedLogin)`` still works on the client.

On the client, an awaited remote failure is raised as
:class:`twisted.spread.pb.RemoteError` whose ``remoteType`` is the UTF-8
encoded dotted name of one of these classes (see :func:`remote_error_name`).

PB's login is an MD5 challenge-response and TCP traffic is cleartext: serve
on loopback, on a ``unix:`` socket, or over ``ssl:``.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import banana, jelly, pb
from zope.interface import implementer

from txjournal.errors import (
    CommandEncodeError,
    InvalidArguments,
    JournalOverloaded,
    JournalWriteError,
    NotRunning,
    ReadOnlyReplica,
    TxJournalError,
    UnknownCommand,
    UnknownQuery,
)
from txjournal.fastbanana import FastBananaMixin
from txjournal.service import JournalService
from txjournal.users import Users, UsersChecker

log = Logger()

#: Longest exception message passed on to a client; the rest is cut, so
#: that a huge message cannot exceed banana's size limit.
MAX_MESSAGE = 4000

#: How deeply arguments and results may nest (which also catches cycles,
#: which jelly's references can build).
MAX_DEPTH = 100

#: How many values arguments or a result may hold in all. Jelly's
#: references let a tiny message stand for a huge tree (a list holding the
#: same list twice, thirty levels deep); this bounds the work spent on one.
MAX_NODES = 1_000_000


# -- errors the client sees ----------------------------------------------------


class RemoteJournalError(pb.Error):
    """
    Base of the errors a client receives on purpose.

    :ivar error_type: the name of the exception behind it (e.g.
        ``InsufficientFunds``), or of this class when there is none.
    :ivar detail: the message without the explanatory prefix.
    """

    def __init__(self, message: str, error_type: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type or type(self).__name__
        self.detail = detail if detail is not None else message

    def __str__(self) -> str:
        return str(self.args[0])


class RemoteCommandError(RemoteJournalError):
    """The command raised. It is journaled (part of history); the model is unchanged."""


class RemoteQueryError(RemoteJournalError):
    """The query raised."""


class RemoteArgumentError(RemoteJournalError):
    """Unknown command or query, or arguments that do not fit. Nothing was written."""


class PermissionDenied(RemoteJournalError):
    """The user's role does not allow this call."""


class ServiceUnavailable(RemoteJournalError):
    """The journal cannot take this call now (starting, stopping, overloaded, failed)."""


class ResultNotPlain(RemoteJournalError):
    """The result is not a plain value (or is too big) and cannot be sent."""


class LoginRefused(pb.Error, UnauthorizedLogin):
    """
    Login failed: unknown user, wrong password, or a kind of credentials
    (anonymous) that the server does not accept.

    A :class:`pb.Error` so that PB sends it without logging a traceback for
    every failed attempt; an :class:`UnauthorizedLogin` so that clients
    checking for that still recognise it.
    """


def remote_error_name(cls: type[BaseException]) -> bytes:
    """
    What a client sees as :attr:`pb.RemoteError.remoteType` for ``cls``:
    its dotted name, UTF-8 encoded (as :class:`pb.CopyableFailure` sends it).
    """
    return f"{cls.__module__}.{cls.__qualname__}".encode()


def _shorten(text: str) -> str:
    if len(text) > MAX_MESSAGE:
        return text[:MAX_MESSAGE] + f"... ({len(text) - MAX_MESSAGE} more characters)"
    return text


def _exception_text(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:
        text = "<message cannot be shown>"
    return _shorten(text)


def _translate(
    failure: Failure, kind: str, name: str
) -> RemoteJournalError:
    """
    Map a failure of a command (``kind`` ``"command"``) or a query to the
    error the client should get, logging what the operator needs to know.
    """
    e = failure.value
    assert e is not None
    error_type = type(e).__name__
    text = _exception_text(e)
    if isinstance(e, RemoteJournalError):
        return e
    if isinstance(e, (UnknownCommand, UnknownQuery, InvalidArguments, CommandEncodeError)):
        return RemoteArgumentError(text, error_type, text)
    if isinstance(e, JournalWriteError):
        # Includes JournalFailed ("not written: ..."); each says what became
        # of the command itself. The engine logged it as critical already.
        return ServiceUnavailable(f"{kind} {name!r}: {text}", error_type, text)
    if isinstance(e, (NotRunning, JournalOverloaded)):
        return ServiceUnavailable(text, error_type, text)
    if isinstance(e, ReadOnlyReplica):
        # Retrying here cannot help: the message names the writer to use.
        return PermissionDenied(text, error_type, text)
    if isinstance(e, TxJournalError):
        log.warn("{kind} {name!r} failed inside txjournal: {error}", kind=kind, name=name, error=text)
        return RemoteJournalError(f"{kind} {name!r} failed: {error_type}: {text}", error_type, text)
    # The command or query itself raised: an outcome, not a server fault.
    log.debug(
        "{kind} {name!r} raised {error_type}: {error}",
        kind=kind, name=name, error_type=error_type, error=text,
    )
    cls = RemoteCommandError if kind == "command" else RemoteQueryError
    return cls(f"{kind} {name!r} failed: {error_type}: {text}", error_type, text)


# -- plain values ----------------------------------------------------------------

_SCALARS = (type(None), bool, int, float)


class _NotPlain(Exception):
    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where} {why}")


def check_plain(value: object, where: str = "value", *, shared_ok: bool = True) -> None:
    """
    Check that ``value`` is a plain value PB can send and the schema accepts.

    Plain means ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes`` and
    lists, tuples and dicts of these, by exact type (jelly cannot send a
    ``str`` subclass such as a ``StrEnum`` as a string). Strings and
    containers must also fit banana's per-item size limit, which would
    otherwise make the answer fail to send and leave the client waiting.

    :raises ValueError: naming where in ``value`` the offending part is.
    """
    budget = [MAX_NODES]
    try:
        _check_plain(value, where, 0, budget, None if shared_ok else set())
    except _NotPlain as e:
        raise ValueError(str(e)) from None


def _check_plain(
    value: object, where: str, depth: int, budget: list[int], seen: set[int] | None = None
) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _NotPlain(where, f"makes the whole hold more than {MAX_NODES} values")
    if depth > MAX_DEPTH:
        raise _NotPlain(where, f"is nested more than {MAX_DEPTH} levels deep (or is cyclic)")
    kind = type(value)
    if kind in _SCALARS:
        return
    limit = banana.SIZE_LIMIT
    if kind is str:
        assert isinstance(value, str)
        # Cheap test first: a UTF-8 character takes at most 4 bytes.
        if len(value) * 4 > limit and len(value.encode("utf-8", "surrogatepass")) > limit:
            raise _NotPlain(where, f"is a string longer than PB's limit of {limit} bytes")
        return
    if kind is bytes:
        assert isinstance(value, bytes)
        if len(value) > limit:
            raise _NotPlain(where, f"is a bytes value longer than PB's limit of {limit} bytes")
        return
    if seen is not None and kind in (list, tuple, dict):
        # Jelly references let a message of a few bytes name the same list
        # millions of times; arguments must be trees, so the check (and the
        # journal encoding after it) costs what the message weighs.
        if id(value) in seen:
            raise _NotPlain(where, "repeats a list or dict by reference; send each value once")
        seen.add(id(value))
    if kind is list or kind is tuple:
        assert isinstance(value, (list, tuple))
        # Jelly sends a list as ["list", item, ...]: one more item than it holds.
        if len(value) + 1 > limit:
            raise _NotPlain(where, f"has more than PB's limit of {limit - 1} items")
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1, budget, seen)
        return
    if kind is dict:
        assert isinstance(value, dict)
        if len(value) + 1 > limit:
            raise _NotPlain(where, f"has more than PB's limit of {limit - 1} items")
        for k, v in value.items():
            _check_plain(k, f"{where} key {k!r:.40}", depth + 1, budget, seen)
            _check_plain(v, f"{where}[{k!r:.40}]", depth + 1, budget, seen)
        return
    raise _NotPlain(where, f"is a {kind.__qualname__}, not a plain value")


def _plain_result(result: object, kind: str, name: str) -> object:
    try:
        check_plain(result, "the result")
    except ValueError as e:
        if kind == "command":
            consequence = "the command was applied, but its result cannot be sent"
        else:
            consequence = "the query's result cannot be sent"
        log.warn("{kind} {name!r}: {problem}", kind=kind, name=name, problem=str(e))
        raise ResultNotPlain(
            f"{kind} {name!r}: {e}; {consequence} (results must be None, bool, int, "
            f"float, str, bytes, or lists, tuples and dicts of these)"
        ) from None
    return result


def _check_call(name: object, kwargs: object, kind: str) -> tuple[str, dict[str, Any]]:
    """Check the shape of a remote call's arguments before anything runs."""
    if not isinstance(name, str) or not name:
        raise RemoteArgumentError(f"the {kind} name must be a non-empty string, got {name!r:.80}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise RemoteArgumentError(
            f"arguments of {kind} {name!r} must be a dict, got {type(kwargs).__name__}"
        )
    for key in kwargs:
        if not isinstance(key, str):
            raise RemoteArgumentError(
                f"argument names of {kind} {name!r} must be strings, got {key!r:.80}"
            )
    try:
        check_plain(kwargs, "arguments", shared_ok=False)
    except ValueError as e:
        raise RemoteArgumentError(f"{kind} {name!r}: {e}") from None
    return name, kwargs


# -- the avatar ----------------------------------------------------------------------


def _error_outcome(failure: Failure) -> dict[str, Any]:
    error = failure.value
    if not isinstance(error, RemoteJournalError):
        error = _translate(failure, "command", "?")
    return {
        "error": {
            "type": error.error_type,
            "message": error.detail,
            "kind": type(error).__name__,
        }
    }


class JournalAvatar(pb.Avatar):
    """
    What a logged-in PB client talks to.

    Calls are refused with :class:`ServiceUnavailable` until the journal
    service runs: under ``twistd`` the PB port listens (in
    ``privilegedStartService``) before the journal has replayed.
    """

    def __init__(self, service: JournalService[Any], name: str, role: str) -> None:
        self.service = service
        self.name = name
        self.role = role

    def __repr__(self) -> str:
        return f"<JournalAvatar {self.name!r} ({self.role})>"

    def _check_running(self) -> None:
        if not self.service.running:
            raise ServiceUnavailable(
                "the journal service is not running (it is starting up or shutting "
                "down); try again later"
            )

    def _check_may_execute(self) -> None:
        if self.role not in ("rw", "admin"):
            raise PermissionDenied(
                f"user {self.name!r} has the read-only role {self.role!r} and may not "
                f"execute commands; queries are allowed"
            )

    def _submit(self, name: str, kwargs: dict[str, Any]) -> Deferred[Any]:
        """Start one command; the Deferred fails with a :class:`RemoteJournalError`."""
        try:
            d = self.service.execute_named(name, kwargs, user=self.name)
        except Exception:
            d = fail()

        def failed(f: Failure) -> Failure:
            return Failure(_translate(f, "command", name))

        d.addCallbacks(_plain_result, failed, callbackArgs=("command", name))
        return d

    def perspective_execute(self, name: object, kwargs: object = None) -> Deferred[Any]:
        """
        Execute the command ``name`` built from ``kwargs``; fire with its
        result once it is durable and applied.
        """
        self._check_running()
        self._check_may_execute()
        cname, ckwargs = _check_call(name, kwargs, "command")
        return self._submit(cname, ckwargs)

    def perspective_execute_many(self, calls: object) -> Deferred[list[dict[str, Any]]]:
        """
        Execute several commands, all submitted before any is waited for (so
        they share journal syncs), and return one outcome per call, in order:
        ``{"ok": result}`` or ``{"error": {"type", "message", "kind"}}``.
        ``type`` names the exception (e.g. ``InsufficientFunds``), ``kind``
        the error :meth:`perspective_execute` would have raised for it.

        The shape of ``calls`` is checked first: if it is not a list of
        ``[name, kwargs]`` pairs, nothing runs at all.
        """
        self._check_running()
        self._check_may_execute()
        if not isinstance(calls, (list, tuple)):
            raise RemoteArgumentError(
                f"execute_many takes a list of [name, kwargs] pairs, got {type(calls).__name__}"
            )
        checked: list[tuple[str, dict[str, Any]]] = []
        for i, call in enumerate(calls):
            if not isinstance(call, (list, tuple)) or len(call) != 2:
                raise RemoteArgumentError(
                    f"execute_many: call {i} is not a [name, kwargs] pair: {call!r:.80}; "
                    f"nothing was executed"
                )
            try:
                checked.append(_check_call(call[0], call[1], "command"))
            except RemoteArgumentError as e:
                raise RemoteArgumentError(
                    f"execute_many: call {i}: {e}; nothing was executed"
                ) from None
        outcomes: list[Deferred[dict[str, Any]]] = []
        for name, kwargs in checked:
            d = self._submit(name, kwargs)
            outcomes.append(d.addCallbacks(lambda result: {"ok": result}, _error_outcome))
        return gatherResults(outcomes)

    def perspective_query(self, name: object, kwargs: object = None) -> Deferred[Any]:
        """
        Run the query ``name`` with ``kwargs`` against the live model. An
        audited query answers once its audit record (naming this user) is
        durable.
        """
        self._check_running()
        qname, qkwargs = _check_call(name, kwargs, "query")

        def failed(f: Failure) -> Failure:
            return Failure(_translate(f, "query", qname))

        d = self.service.query_as(self.name, qname, qkwargs)
        return d.addCallbacks(_plain_result, failed, callbackArgs=("query", qname))

    def perspective_status(self) -> dict[str, Any]:
        """
        What this server is: ``{"role", "last_seq", "lag", "error"}``.
        ``role`` is ``"writer"``, ``"replica"``, or ``"failed"`` for a
        writer that stopped accepting commands (a write error, or fenced by
        a new writer) or a replica that stopped following (a gap, damage);
        ``error`` then says why. ``lag`` is :meth:`ReplicaService.lag` for
        a replica, ``None`` otherwise. Any logged-in user may ask: clients
        use it to find the writer after a failover.
        """
        self._check_running()
        service: Any = self.service
        if getattr(service, "promoted", None) is False:
            lag = service.lag()
            halted = service.halted
            return {
                "role": "failed" if halted is not None else "replica",
                "last_seq": lag["last_applied_seq"],
                "lag": lag,
                "error": _shorten(halted.getErrorMessage()) if halted is not None else None,
            }
        engine = service.engine
        failed = engine.failed
        return {
            "role": "failed" if failed is not None else "writer",
            "last_seq": engine.applied_seq,
            "lag": None,
            "error": _exception_text(failed) if failed is not None else None,
        }

    def perspective_promote(self, take_over: object = False) -> Deferred[dict[str, Any]]:
        """
        Turn this replica into the writer (see
        :meth:`~txjournal.replica.ReplicaService.promote`); fire with the
        new :meth:`perspective_status`. Only for users with the ``admin``
        role. ``take_over`` fences a writer that is still alive.
        """
        self._check_running()
        if self.role != "admin":
            raise PermissionDenied(
                f"user {self.name!r} has the role {self.role!r}; promoting a replica needs "
                f"the admin role"
            )
        if not isinstance(take_over, bool):
            raise RemoteArgumentError(f"take_over must be true or false, not {type(take_over).__name__}")
        promote = getattr(self.service, "promote", None)
        if promote is None:
            raise RemoteArgumentError("this server is a writer already, not a replica: nothing to promote")
        log.warn(
            "User {name!r} asked to promote this replica to writer (take over: {take_over})",
            name=self.name, take_over=take_over,
        )

        def failed(f: Failure) -> Failure:
            return Failure(_translate(f, "action", "promote"))

        d: Deferred[Any] = promote(take_over=take_over)
        return d.addCallbacks(lambda _: self.perspective_status(), failed)

    def perspective_describe(self) -> dict[str, Any]:
        """The schema's commands and queries with their argument types."""
        description = self.service.schema.describe()
        try:
            check_plain(description, "the schema description")
        except ValueError as e:
            raise ResultNotPlain(str(e)) from None
        return description

    def logout(self) -> None:
        """Called by PB when the client disconnects or logs out."""
        log.info("User {name!r} disconnected", name=self.name)


# -- realm, portal, factory -------------------------------------------------------


@implementer(IRealm)
class JournalRealm:
    """
    Turns an avatar id from :class:`~txjournal.users.UsersChecker` into a
    :class:`JournalAvatar` with the user's role.

    Login fails with :class:`ServiceUnavailable` while the journal is not
    running, so that a client connecting during start-up replay gets a
    clear answer rather than an avatar that refuses everything.
    """

    def __init__(self, service: JournalService[Any], users: Users) -> None:
        self.service = service
        self.users = users

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, JournalAvatar, Any]:
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("txjournal only offers PB perspectives")
        if isinstance(avatarId, bytes):
            name = avatarId.decode("utf-8")
        elif isinstance(avatarId, str):
            name = avatarId
        else:
            raise LoginRefused("login refused: anonymous login is not allowed")
        user = self.users.get(name)
        if user is None:
            raise LoginRefused("login refused: unknown user or wrong password")
        if not self.service.running:
            raise ServiceUnavailable(
                "the journal service is not running yet (or is stopping); try again later"
            )
        avatar = JournalAvatar(self.service, user.name, user.role)
        log.info("User {name!r} logged in with role {role}", name=user.name, role=user.role)
        return pb.IPerspective, avatar, avatar.logout


class JournalPortal(Portal):
    """
    A :class:`Portal` whose refused logins reach PB clients as
    :class:`LoginRefused`.

    PB logs every failure that is not a :class:`pb.Error` with a full
    traceback ("Peer will receive following PB traceback"); a stock portal
    would let anyone fill the server's log by guessing passwords.
    """

    def login(self, credentials: Any, mind: object, *interfaces: Any) -> Deferred[Any]:
        def refused(f: Failure) -> Failure:
            if f.check(LoginRefused):
                return f
            if f.check(UnauthorizedLogin):
                return Failure(LoginRefused("login refused: unknown user or wrong password"))
            if f.check(LoginFailed):
                log.info("Login refused: {reason}", reason=f.getErrorMessage())
                return Failure(LoginRefused(
                    "login refused: these credentials are not accepted (anonymous "
                    "login is not allowed)"
                ))
            return f

        return super().login(credentials, mind, *interfaces).addErrback(refused)


class BasicTypesOnly(jelly.SecurityOptions):
    """
    Jelly security that unserializes plain values and nothing else.

    A stock ``SecurityOptions()`` with ``allowBasicTypes()`` is not enough:
    its ``isTypeAllowed`` accepts *any* type name containing a dot, and the
    unjellier then instantiates whatever class is registered under that name
    with ``setUnjellyableForClass``, a registry shared by the whole process
    (Twisted itself registers ``CopyableFailure`` there, and an application
    module imported by the server may register more). This class allows
    exactly the listed names.

    The same security object also vets what the server *sends*, and the
    jellier asks about an outgoing value by its qualified class name
    (``builtins.tuple``): those names are allowed for the plain types only.
    No jelly tag and no registered class has such a name, so this opens
    nothing on the receiving side (and :meth:`isModuleAllowed` refuses
    ``builtins`` as a module to build instances from).

    It also drops the date/time, decimal and set types that
    ``SecurityOptions`` allows by default: they are not plain values and
    would be refused later anyway.
    """

    _NOT_PLAIN = (b"datetime", b"time", b"date", b"timedelta", b"decimal", b"set", b"frozenset")

    #: Outgoing values are checked by qualified class name.
    _PLAIN_CLASSES = tuple(
        f"builtins.{cls.__name__}".encode()
        for cls in (type(None), bool, int, float, str, bytes, list, tuple, dict)
    )

    def __init__(self) -> None:
        super().__init__()
        for name in self._NOT_PLAIN:
            self.allowedTypes.pop(name, None)
        self.allowBasicTypes()
        self.allowTypes(*self._PLAIN_CLASSES)

    def isTypeAllowed(self, typeName: str | bytes) -> bool:
        if not isinstance(typeName, bytes):
            typeName = typeName.encode("utf-8")
        return typeName in self.allowedTypes

    def isModuleAllowed(self, moduleName: str | bytes) -> bool:
        return False

    def isClassAllowed(self, klass: type) -> bool:
        return False


class _Quiet:
    """Wraps a PB target so that malformed calls fail with a short pb.Error."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def remoteMessageReceived(self, broker: Any, message: str, args: Any, kw: Any) -> Any:
        try:
            return self._target.remoteMessageReceived(broker, message, args, kw)
        except pb.Error:
            raise
        except (jelly.InsecureJelly, AttributeError, TypeError) as e:
            # Anyone who can connect can send these, logged in or not: one
            # short line each, never PB's full traceback.
            text = _shorten(f"{type(e).__name__}: {e}")[:300]
            log.info("Refused a malformed PB call {message!r:.60}: {error}", message=message, error=text)
            raise RemoteArgumentError(f"refused call {message[:60]!r}: {text}") from None


class QuietBroker(FastBananaMixin, pb.Broker):
    """
    A PB broker that answers malformed calls without logging tracebacks,
    and decodes Banana with :mod:`txjournal.fastbanana`.
    """

    def _recvMessage(self, findObjMethod: Any, requestID: Any, objectID: Any, message: Any,
                     answerRequired: Any, netArgs: Any, netKw: Any) -> None:
        def find(object_id: Any) -> Any:
            target = findObjMethod(object_id)
            return None if target is None else _Quiet(target)

        super()._recvMessage(find, requestID, objectID, message, answerRequired, netArgs, netKw)


def make_portal(service: JournalService[Any], users: Users) -> JournalPortal:
    """The portal for ``service``: the users file checker only, no anonymous access."""
    return JournalPortal(JournalRealm(service, users), [UsersChecker(users)])


def pb_factory(service: JournalService[Any], users: Users) -> pb.PBServerFactory:
    """
    The PB server factory for ``service``, to listen with on any endpoint
    (``strports.service(description, pb_factory(service, users))``).

    Tracebacks are never sent (``unsafeTracebacks=False``) and the jelly
    security is :class:`BasicTypesOnly`.
    """
    factory = pb.PBServerFactory(
        make_portal(service, users), unsafeTracebacks=False, security=BasicTypesOnly()
    )
    factory.protocol = QuietBroker
    return factory
