"""
The users file (parsing, permissions, adding users) and the cred checker.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.spread.pb import _PortalAuthChallenger, challenge, respond
from zope.interface import implementer
from zope.interface.verify import verifyObject

from txjournal.errors import TxJournalError
from txjournal.users import (
    UnsafeUsersFile,
    User,
    Users,
    UsersChecker,
    UsersFileError,
    add_user,
    load_users,
    parse_users,
)


@implementer(IUsernameHashedPassword)
class UsernameHashedPassword:
    """Hashed-password credentials that compare plaintext (cred's deprecated one, inlined)."""

    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = username
        self.password = password

    def checkPassword(self, password: bytes) -> bool:
        return password == self.password


def write_users(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return str(path)


# -- parsing ------------------------------------------------------------------


def test_parse_comments_blank_lines_and_roles() -> None:
    users = parse_users(
        "# a comment\n\nadmin:s3cret:rw\n   \n  # indented comment\nreader:pw:ro\n", "f"
    )
    assert list(users) == ["admin", "reader"]
    assert users["admin"] == User("admin", b"s3cret", "rw")
    assert users["admin"].can_execute
    assert User("ops", b"x", "admin").can_execute  # admin: rw plus promotion
    assert not users["reader"].can_execute


def test_password_may_contain_colons() -> None:
    users = parse_users("alice:a:b:c:ro\n", "f")
    assert users["alice"].password == b"a:b:c"
    assert users["alice"].role == "ro"


def test_repr_hides_passwords() -> None:
    users = parse_users("alice:topsecret:rw\n", "f")
    assert "topsecret" not in repr(users["alice"])
    assert "topsecret" not in repr(users)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("alice", "expected 'name:password:role'"),
        ("alice:rw", "expected 'name:password:role'"),
        (":pw:rw", "user name is empty"),
        ("alice::rw", "password is empty"),
        ("alice:pw:root", "role 'root' is not one of rw, ro, admin"),
        ("alice:pw:", "role '' is not one of"),
        ("al ice:pw:rw", "whitespace"),
        ("alice: pw:rw", "leading or trailing whitespace"),
        ("x" * 300 + ":pw:rw", "longer than 255 bytes"),
    ],
)
def test_malformed_line_names_file_and_line(line: str, fragment: str) -> None:
    with pytest.raises(UsersFileError) as e:
        parse_users(f"# header\nok:pw:ro\n{line}\n", "/etc/users")
    assert "/etc/users, line 3" in str(e.value)
    assert fragment in str(e.value)
    assert isinstance(e.value, TxJournalError)


def test_duplicate_user_names_both_lines() -> None:
    with pytest.raises(UsersFileError, match=r"f, line 4: user 'bob' is listed twice \(first on line 2\)"):
        parse_users("a:pw:rw\nbob:pw:rw\n\nbob:other:ro\n", "f")


# -- the file -----------------------------------------------------------------


def test_load_users(tmp_path: Path) -> None:
    path = write_users(tmp_path / "users", "alice:pw:rw\n", 0o600)
    users = load_users(path)
    assert users["alice"].password == b"pw"
    assert users.path == path


@pytest.mark.parametrize("mode", [0o604, 0o602, 0o601, 0o666, 0o644])
def test_refuses_file_open_to_other(tmp_path: Path, mode: int) -> None:
    path = write_users(tmp_path / "users", "alice:pw:rw\n", mode)
    with pytest.raises(UnsafeUsersFile) as e:
        load_users(path)
    assert path in str(e.value)
    assert "chmod 600" in str(e.value)
    assert isinstance(e.value, TxJournalError)


def test_group_readable_is_accepted(tmp_path: Path) -> None:
    # Only "other" is checked: a service group sharing the file is a choice.
    path = write_users(tmp_path / "users", "alice:pw:rw\n", 0o640)
    assert "alice" in load_users(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="cannot read users file"):
        load_users(str(tmp_path / "nope"))


def test_directory_is_not_a_users_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(UsersFileError, match="not a regular file"):
        load_users(str(tmp_path / "d"))


def test_non_utf8_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"a:pw:rw\nb:\xff:rw\n")
    path.chmod(0o600)
    with pytest.raises(UsersFileError, match=r"line 2: not valid UTF-8"):
        load_users(str(path))


# -- add_user -----------------------------------------------------------------


def test_add_user_creates_private_file_with_generated_password(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "users")
    password = add_user(path, "admin", "rw")
    assert len(password) >= 20
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = load_users(path)
    assert users["admin"] == User("admin", password.encode(), "rw")
    # No temporary files left behind.
    assert os.listdir(tmp_path / "sub") == ["users"]


def test_add_user_appends_and_keeps_existing_lines(tmp_path: Path) -> None:
    path = write_users(tmp_path / "users", "# mine\nalice:pw:rw", 0o600)
    assert add_user(path, "bob", "ro", "given") == "given"
    text = Path(path).read_text()
    assert text.startswith("# mine\nalice:pw:rw\n")
    users = load_users(path)
    assert users["bob"] == User("bob", b"given", "ro")
    assert users["alice"].password == b"pw"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_add_user_generates_different_passwords(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    assert add_user(path, "a", "rw") != add_user(path, "b", "rw")


@pytest.mark.parametrize(
    ("name", "role", "password", "fragment"),
    [
        ("bad:name", "rw", None, "contains ':'"),
        ("alice", "root", None, "role 'root'"),
        ("alice", "rw", " padded", "whitespace"),
        ("", "rw", None, "empty"),
    ],
)
def test_add_user_rejects_bad_input(
    tmp_path: Path, name: str, role: str, password: str | None, fragment: str
) -> None:
    path = str(tmp_path / "users")
    with pytest.raises(UsersFileError, match=fragment):
        add_user(path, name, role, password)
    assert not os.path.exists(path)


def test_add_user_refuses_duplicate(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    add_user(path, "alice", "rw", "one")
    with pytest.raises(UsersFileError, match="user 'alice' already exists"):
        add_user(path, "alice", "ro", "two")
    assert load_users(path)["alice"].password == b"one"


def test_add_user_refuses_unsafe_existing_file(tmp_path: Path) -> None:
    path = write_users(tmp_path / "users", "alice:pw:rw\n", 0o644)
    with pytest.raises(UnsafeUsersFile):
        add_user(path, "bob", "rw")


# -- the checker ----------------------------------------------------------------


@pytest.fixture
def checker() -> UsersChecker:
    return UsersChecker(
        Users({"alice": User("alice", b"wonderland", "rw"), "bob": User("bob", b"builder", "ro")})
    )


def test_checker_provides_interface(checker: UsersChecker) -> None:
    assert verifyObject(ICredentialsChecker, checker)
    assert IUsernamePassword in checker.credentialInterfaces
    assert IUsernameHashedPassword in checker.credentialInterfaces


@pytest_twisted.ensureDeferred
async def test_plaintext_credentials(checker: UsersChecker) -> None:
    assert await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")) == b"alice"
    # A str user name (not cred's convention, but harmless) works too.
    assert await checker.requestAvatarId(UsernamePassword("bob", b"builder")) == b"bob"  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_hashed_credentials(checker: UsersChecker) -> None:
    creds = UsernameHashedPassword(b"alice", b"wonderland")
    assert await checker.requestAvatarId(creds) == b"alice"


@pytest_twisted.ensureDeferred
async def test_pb_challenge_response_credentials(checker: UsersChecker) -> None:
    """What PB's login hands the portal: MD5 challenge-response."""
    nonce = challenge()
    good = _PortalAuthChallenger(None, None, b"alice", nonce)
    good.response = respond(nonce, b"wonderland")
    assert await checker.requestAvatarId(good) == b"alice"
    bad = _PortalAuthChallenger(None, None, b"alice", nonce)
    bad.response = respond(nonce, b"guess")
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(bad)


@pytest.mark.parametrize(
    "creds",
    [
        UsernamePassword(b"alice", b"wrong"),
        UsernamePassword(b"nobody", b"wonderland"),
        UsernamePassword(b"\xff\xfe", b"x"),
        UsernameHashedPassword(b"nobody", b"x"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusals_look_alike(checker: UsersChecker, creds: Any) -> None:
    with pytest.raises(UnauthorizedLogin) as e:
        await checker.requestAvatarId(creds)
    # No hint whether the user exists.
    assert type(e.value) is UnauthorizedLogin
    assert str(e.value) == ""
