"""
The users file and the ``twisted.cred`` checker that reads it.

The file holds one user per line::

    # name:password:role
    admin:Zk3...:rw
    reports:q9X...:ro

``role`` is ``rw`` (may execute commands and run queries), ``ro`` (may
only run queries) or ``admin`` (as ``rw``, and may also run operator
actions such as promoting a replica to writer). Blank lines and lines starting with ``#`` are ignored.
The password is everything between the first and the last colon, so it may
itself contain colons.

Passwords are stored in **plaintext** on purpose: Perspective Broker logs in
with an MD5 challenge-response, so the server must be able to compute
``md5(password)`` itself, which no salted password hash allows (see
TWISTED-NOTES). The file is therefore treated like a private key: it must
not be readable or writable by "other" users, :func:`add_user` creates it
with mode 0600, and loading refuses anything looser. Because the login
exchange is only as strong as MD5, serve PB over ``ssl:`` or ``unix:``
endpoints when anything but loopback traffic is involved.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from txjournal.errors import TxJournalError

#: The roles a user may have: ``rw`` executes commands and queries,
#: ``ro`` only queries, ``admin`` also runs operator actions (promotion).
ROLES = ("rw", "ro", "admin")

#: Mode bits a users file must not have: nothing for "other".
_FORBIDDEN_MODE = 0o007

#: The journal stores the user name of every command in one length byte.
_MAX_NAME_BYTES = 255


class UsersFileError(TxJournalError):
    """The users file is malformed, or a user cannot be added to it."""


class UnsafeUsersFile(UsersFileError):
    """The users file is readable or writable by other users of the machine."""


@dataclasses.dataclass(frozen=True)
class User:
    """
    One line of the users file.

    ``repr`` hides the password so that a user object can be logged.
    """

    name: str
    password: bytes = dataclasses.field(repr=False)
    role: str

    @property
    def can_execute(self) -> bool:
        """Whether this user may execute commands (only queries otherwise)."""
        return self.role in ("rw", "admin")


class Users(Mapping[str, User]):
    """
    The parsed users file: a read-only mapping from user name to :class:`User`.

    :param path: where the users were read from, for messages; ``None`` for
        a database built in memory (tests, embedding programs).
    """

    def __init__(self, users: Mapping[str, User] | None = None, path: str | None = None) -> None:
        self._users = dict(users or {})
        self.path = path

    def __getitem__(self, name: str) -> User:
        return self._users[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._users)

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"<Users from {self.path or 'memory'}: {', '.join(self._users) or 'none'}>"


def check_name(name: str) -> str | None:
    """
    Why ``name`` cannot be a user name, or ``None`` if it can.

    Names are kept simple because they end up in the journal (at most 255
    bytes) and in log lines, and because a colon would break the file format.
    """
    if not name:
        return "user name is empty"
    if ":" in name:
        return f"user name {name!r} contains ':'"
    if name.startswith("#"):
        return f"user name {name!r} starts with '#', which marks a comment"
    if any(c.isspace() or not c.isprintable() for c in name):
        return f"user name {name!r} contains whitespace or unprintable characters"
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        return f"user name {name[:20]!r}... is longer than {_MAX_NAME_BYTES} bytes"
    return None


def _check_password(password: str) -> str | None:
    if not password:
        return "password is empty"
    if password != password.strip():
        # Invisible in an editor and surely a mistake; refusing beats a
        # login that fails for no visible reason.
        return "password has leading or trailing whitespace"
    if "\n" in password or "\r" in password:
        return "password contains a line break"
    return None


def _check_role(role: str) -> str | None:
    if role not in ROLES:
        return f"role {role!r} is not one of {', '.join(ROLES)}"
    return None


def check_file_mode(path: str) -> None:
    """
    Refuse a users file that other users could read or change.

    :raises UnsafeUsersFile: with the fix (``chmod 600``) in the message.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsersFileError(f"cannot read users file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsersFileError(f"users file {path} is not a regular file")
    if st.st_mode & _FORBIDDEN_MODE:
        raise UnsafeUsersFile(
            f"users file {path} is accessible to other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); it holds plaintext passwords: "
            f"run 'chmod 600 {path}'"
        )


def parse_users(text: str, path: str = "<users>") -> Users:
    """
    Parse the text of a users file.

    :param path: named in every error message, with the line number.
    :raises UsersFileError: for a malformed line or a duplicate user.
    """
    users: dict[str, User] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}, line {number}"
        name, sep1, rest = line.partition(":")
        password, sep2, role = rest.rpartition(":")
        if not sep1 or not sep2:
            raise UsersFileError(f"{where}: expected 'name:password:role', got no or one ':'")
        problem = check_name(name) or _check_password(password) or _check_role(role)
        if problem:
            raise UsersFileError(f"{where}: {problem}")
        if name in users:
            raise UsersFileError(
                f"{where}: user {name!r} is listed twice (first on line {first_line[name]})"
            )
        users[name] = User(name, password.encode("utf-8"), role)
        first_line[name] = number
    return Users(users, path)


def load_users(path: str) -> Users:
    """
    Read and check a users file.

    The file mode is checked before the contents are read, so that a file
    anybody can read is refused even if it is otherwise fine: its
    passwords must be considered leaked and changed.

    :raises UnsafeUsersFile: if "other" may read or write the file.
    :raises UsersFileError: if it cannot be read or is malformed.
    """
    path = os.path.abspath(path)
    check_file_mode(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsersFileError(f"cannot read users file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsersFileError(f"{path}, line {line}: not valid UTF-8") from None
    return parse_users(text, path)


def add_user(path: str, name: str, role: str, password: str | None = None) -> str:
    """
    Add a user to the users file, creating the file (mode 0600) if needed.

    The file is rewritten atomically (temporary file, fsync, rename, fsync of
    the directory), so a crash leaves either the old or the new file, never a
    half-written line that would stop the server from starting.

    :param password: ``None`` to generate one with :func:`secrets.token_urlsafe`.
    :return: the password (the generated one, if none was given), so that the
        caller can show it once.
    :raises UsersFileError: for a bad name, role or password, a user that
        already exists, or an existing file that is malformed or unsafe.
    """
    path = os.path.abspath(path)
    problem = check_name(name) or _check_role(role)
    if password is None:
        password = secrets.token_urlsafe(24)
    problem = problem or _check_password(password)
    if problem:
        raise UsersFileError(f"cannot add user to {path}: {problem}")
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    text = ""
    if os.path.lexists(path):
        existing = load_users(path)
        if name in existing:
            raise UsersFileError(f"user {name!r} already exists in {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text and not text.endswith("\n"):
            text += "\n"
    else:
        text = "# txjournal users: name:password:role (role rw or ro). Keep this file mode 0600.\n"
    text += f"{name}:{password}:{role}\n"
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return password


def _username_text(username: Any) -> str | None:
    """The user name from credentials: bytes (cred's convention) or str."""
    if isinstance(username, bytes):
        try:
            return username.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(username, str):
        return username
    return None


#: Checked against when the user is unknown, so that an unknown user costs
#: the same work as a wrong password and timing gives no hint which it was.
_DUMMY_PASSWORD = secrets.token_bytes(24)


@implementer(ICredentialsChecker)
class UsersChecker:
    """
    Checks user names and passwords against a :class:`Users` database.

    Accepts :class:`IUsernamePassword` (plaintext, e.g. from a local tool)
    and :class:`IUsernameHashedPassword`, which is what PB's MD5
    challenge-response login produces: its ``checkPassword(plaintext)``
    hashes the stored password with the challenge and compares.

    The avatar id is the user name encoded as UTF-8 bytes, as
    :class:`ICredentialsChecker` specifies. An unknown user and a wrong
    password both fail with a bare :class:`UnauthorizedLogin`, so a client
    cannot probe which user names exist.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    log = Logger()

    def __init__(self, users: Users) -> None:
        self.users = users

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        name = _username_text(getattr(credentials, "username", None))
        user = self.users.get(name) if name is not None else None
        stored = user.password if user is not None else _DUMMY_PASSWORD
        if IUsernamePassword.providedBy(credentials) and isinstance(
            getattr(credentials, "password", None), bytes
        ):
            d: Deferred[Any] = maybeDeferred(hmac.compare_digest, credentials.password, stored)
        elif IUsernameHashedPassword.providedBy(credentials):
            d = maybeDeferred(credentials.checkPassword, stored)
        else:
            return fail(UnauthorizedLogin())

        def checked(ok: object) -> bytes:
            if not ok or user is None:
                self.log.info("Login refused for user {name!r}", name=name)
                raise UnauthorizedLogin()
            return user.name.encode("utf-8")

        return d.addCallback(checked)
