"""
``twistd journal``: option parsing, the service it makes, the plugin, and
the wheel that ships the plugin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.spread import pb

from examples.bank import bank
from txjournal import JournalService
from txjournal.journal.file import DEFAULT_SEGMENT_SIZE
from txjournal.pb import ServiceUnavailable, remote_error_name
from txjournal.tap import DEFAULT_PB, Options, absolute_endpoint, makeService

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users"
    path.write_text("admin:admin-pw:rw\nreader:reader-pw:ro\n")
    path.chmod(0o600)
    return str(path)


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


# -- options --------------------------------------------------------------------


def test_defaults(users_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    options = parse("--app", "examples.bank:bank", "--users", users_file)
    assert options["schema"] is bank
    assert options["datadir"] == str(tmp_path / "var" / "bank")
    assert options["pb"] == DEFAULT_PB == "tcp:8789:interface=127.0.0.1"
    assert options["snapshot-interval"] == 300.0
    assert options["keep-snapshots"] == 3
    assert options["segment-size"] == DEFAULT_SEGMENT_SIZE
    assert not options["no-pb"]
    assert not options["no-snapshot-on-stop"]
    assert not options["unsafe-no-sync"]
    assert options["users_db"] is not None
    assert set(options["users_db"]) == {"admin", "reader"}


def test_paths_made_absolute(users_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd may chdir before the service starts: every path is absolute at parse time."""
    monkeypatch.chdir(tmp_path)
    options = parse(
        "--app", "examples.bank:bank",
        "--datadir", "data/here",
        "--users", "users",
        "--pb", "unix:sock/pb.sock:mode=600",
    )
    assert options["datadir"] == str(tmp_path / "data" / "here")
    assert options["users"] == users_file
    assert options["pb"] == f"unix:{tmp_path}/sock/pb.sock:mode=600"


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("unix:rel.sock", "unix:{cwd}/rel.sock"),
        ("unix:address=rel.sock:mode=600", "unix:address={cwd}/rel.sock:mode=600"),
        ("unix:mode=600:address=rel.sock", "unix:mode=600:address={cwd}/rel.sock"),
        ("unix:/abs.sock:lockfile=1", "unix:/abs.sock:lockfile=1"),
        ("unix:a\\:b", "unix:{cwd}/a\\:b"),
        ("tcp:8789:interface=127.0.0.1", "tcp:8789:interface=127.0.0.1"),
        ("ssl:8789:privateKey=key.pem", "ssl:8789:privateKey=key.pem"),
    ],
)
def test_absolute_endpoint(
    description: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_endpoint(description) == expected.format(cwd=tmp_path)


def test_snapshot_and_journal_options(users_file: str, tmp_path: Path) -> None:
    options = parse(
        "--app", "examples.bank:bank", "--users", users_file, "--datadir", str(tmp_path),
        "--snapshot-interval", "0", "--keep-snapshots", "5", "--segment-size", "1048576",
        "--no-snapshot-on-stop", "--unsafe-no-sync",
    )
    assert options["snapshot-interval"] == 0.0
    assert options["keep-snapshots"] == 5
    assert options["segment-size"] == 1048576
    assert options["no-snapshot-on-stop"]
    assert options["unsafe-no-sync"]


@pytest.mark.parametrize(
    ("app", "fragment"),
    [
        ("no_such_module_xyz:schema", "cannot import module 'no_such_module_xyz'"),
        ("examples.bank:nope", "has no attribute 'nope'"),
        ("examples.bank:Bank", "'Bank' is a type, not a txjournal.Schema"),
        ("examples.bank:bank.name", "is a str, not a txjournal.Schema"),
        ("examples.bank", "must look like 'package.module:attribute'"),
        ("examples.bank:", "must look like"),
    ],
)
def test_bad_app(app: str, fragment: str, users_file: str) -> None:
    with pytest.raises(usage.UsageError) as e:
        parse("--app", app, "--users", users_file)
    assert fragment in str(e.value)


def test_app_required(users_file: str) -> None:
    with pytest.raises(usage.UsageError, match="--app"):
        parse("--users", users_file)


def test_app_module_from_current_directory(
    tmp_path: Path, users_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twistd does not put the current directory on sys.path; --app does."""
    (tmp_path / "myapp_tap_test.py").write_text(
        "from txjournal import Schema\nschema = Schema('mine', model=dict)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "myapp_tap_test", raising=False)
    try:
        options = parse("--app", "myapp_tap_test:schema", "--users", users_file)
    finally:
        sys.modules.pop("myapp_tap_test", None)
    assert options["schema"].name == "mine"
    assert options["datadir"] == str(tmp_path / "var" / "mine")
    assert str(tmp_path) in sys.path


def test_broken_app_module(tmp_path: Path, users_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_tap_test.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    with pytest.raises(usage.UsageError, match="RuntimeError: boom at import"):
        parse("--app", "broken_tap_test:schema", "--users", users_file)


def test_users_required_unless_no_pb(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--users FILE is required"):
        parse("--app", "examples.bank:bank")
    options = parse("--app", "examples.bank:bank", "--no-pb", "--datadir", str(tmp_path))
    assert options["users_db"] is None


def test_bad_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("admin:pw:rw\nadmin:pw2:ro\n")
    path.chmod(0o600)
    with pytest.raises(usage.UsageError, match=r"line 2: user 'admin' is listed twice"):
        parse("--app", "examples.bank:bank", "--users", str(path))
    path.write_text("admin:pw:superuser\n")
    with pytest.raises(usage.UsageError, match=r"line 1: role 'superuser'"):
        parse("--app", "examples.bank:bank", "--users", str(path))
    with pytest.raises(usage.UsageError, match="cannot read users file"):
        parse("--app", "examples.bank:bank", "--users", str(tmp_path / "missing"))


def test_empty_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# nobody\n")
    path.chmod(0o600)
    with pytest.raises(usage.UsageError, match="lists no users"):
        parse("--app", "examples.bank:bank", "--users", str(path))


def test_world_readable_users_file(users_file: str) -> None:
    os.chmod(users_file, 0o644)
    with pytest.raises(usage.UsageError, match="chmod 600"):
        parse("--app", "examples.bank:bank", "--users", users_file)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--snapshot-interval", "-1"], "non-negative"),
        (["--snapshot-interval", "soon"], "soon"),
        (["--keep-snapshots", "0"], "positive integer"),
        (["--segment-size", "10"], "too small"),
        (["--pb", "tpc:8789"], "unknown endpoint type 'tpc'"),
        (["--pb", "tcp:notaport"], "not a usable endpoint"),
        (["--pb", "ssl:8789:privateKey=/no/such/key.pem"], "not a usable endpoint"),
        (["--snapshot-replay", "--journal", "sqlite:///x.db"], "--snapshot-replay is for a writer"),
        (["--snapshot-replay", "--snapshots", "sqlite:///x.db"], "--snapshot-replay is for a writer"),
    ],
)
def test_bad_values(argv: list[str], fragment: str, users_file: str) -> None:
    with pytest.raises(usage.UsageError) as e:
        parse("--app", "examples.bank:bank", "--users", users_file, *argv)
    assert fragment in str(e.value)


# -- makeService ------------------------------------------------------------------


def test_make_service_order_and_settings(users_file: str, tmp_path: Path) -> None:
    options = parse(
        "--app", "examples.bank:bank", "--users", users_file, "--datadir", str(tmp_path / "d"),
        "--snapshot-interval", "0", "--keep-snapshots", "7", "--no-snapshot-on-stop",
        "--unsafe-no-sync", "--segment-size", "100000",
    )
    top = makeService(options)
    assert isinstance(top, MultiService)
    children = list(top)
    assert len(children) == 2
    journal, listener = children
    # The journal first: MultiService starts children in order, so the model
    # is replayed before the PB service starts.
    assert isinstance(journal, JournalService)
    assert isinstance(listener, StreamServerEndpointService)
    assert top.getServiceNamed("journal") is journal
    assert top.getServiceNamed("pb") is listener
    assert journal.schema is bank
    assert journal.datadir == str(tmp_path / "d")
    assert journal.sync is False
    assert journal.snapshot_interval is None
    assert journal.snapshot_on_stop is False
    assert journal.keep_snapshots == 7
    assert journal.segment_size == 100000
    assert not journal.running


def test_make_service_defaults_and_no_pb(tmp_path: Path) -> None:
    options = parse("--app", "examples.bank:bank", "--no-pb", "--datadir", str(tmp_path / "d"))
    top = makeService(options)
    (journal,) = list(top)
    assert isinstance(journal, JournalService)
    assert journal.sync is True
    assert journal.snapshot_interval == 300.0
    assert journal.snapshot_on_stop is True
    assert journal.snapshot_app is None


def test_snapshot_replay_names_the_app(tmp_path: Path) -> None:
    options = parse(
        "--app", "examples.bank:bank", "--no-pb", "--datadir", str(tmp_path / "d"),
        "--snapshot-replay",
    )
    (journal,) = list(makeService(options))
    assert isinstance(journal, JournalService)
    assert journal.snapshot_app == "examples.bank:bank"
    assert journal.snapshot_timeout == 3600.0
    options = parse(
        "--app", "examples.bank:bank", "--no-pb", "--datadir", str(tmp_path / "d"),
        "--snapshot-timeout", "0",
    )
    (journal,) = list(makeService(options))
    assert isinstance(journal, JournalService)
    assert journal.snapshot_timeout is None


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_service_lifecycle_over_unix_socket(users_file: str, tmp_path: Path) -> None:
    """
    The twistd sequence by hand: privilegedStartService opens the port before
    the journal has replayed, and a login in that window is refused cleanly;
    after startService the same listener serves.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXClientEndpoint

    socket = tmp_path / "pb.sock"
    options = parse(
        "--app", "examples.bank:bank", "--users", users_file,
        "--datadir", str(tmp_path / "data"), "--pb", f"unix:{socket}:mode=600",
    )
    top = makeService(options)
    top.privilegedStartService()
    brokers: list[tuple[pb.PBClientFactory, Deferred[None]]] = []

    async def login(name: str, password: str) -> Any:
        factory = pb.PBClientFactory()
        broker = await UNIXClientEndpoint(reactor, str(socket)).connect(factory)
        lost: Deferred[None] = Deferred()
        broker.notifyOnDisconnect(lambda: lost.callback(None))
        brokers.append((factory, lost))
        return await factory.login(UsernamePassword(name.encode(), password.encode()))

    try:
        assert socket.exists()
        assert (socket.stat().st_mode & 0o777) == 0o600
        with pytest.raises(pb.RemoteError) as e:
            await login("admin", "admin-pw")
        assert e.value.remoteType == remote_error_name(ServiceUnavailable)
        top.startService()
        avatar = await login("admin", "admin-pw")
        assert await avatar.callRemote("execute", "deposit", {"account": "a", "amount": 3}) == 3
        reader = await login("reader", "reader-pw")
        assert await reader.callRemote("query", "balance", {"account": "a"}) == 3
    finally:
        for factory, _ in brokers:
            factory.disconnect()
        for _, lost in brokers:
            await lost
        await top.stopService()
    assert not socket.exists()
    # The clean stop wrote a snapshot.
    assert os.listdir(tmp_path / "data" / "snapshots")


# -- the plugin and the wheel ----------------------------------------------------------


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=110, **kw)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_twistd_lists_plugin() -> None:
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    result = _run([*twistd, "--help"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "journal" in result.stdout
    assert "txjournal" in result.stdout or "Perspective Broker" in result.stdout
    result = _run([*twistd, "journal", "--help"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for option in ("--app", "--datadir", "--pb", "--users", "--snapshot-interval", "--unsafe-no-sync"):
        assert option in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_twistd_reports_usage_errors(tmp_path: Path) -> None:
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    result = _run([*twistd, "-n", "journal", "--app", "examples.bank:nope", "--no-pb"], cwd=ROOT)
    assert result.returncode != 0
    assert "has no attribute 'nope'" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_wheel_ships_plugin_without_namespace_inits(tmp_path: Path) -> None:
    """
    The plugin must land in the wheel, and twisted/__init__.py or
    twisted/plugins/__init__.py must not (they would shadow Twisted itself).
    Built from a copy so that concurrent builds in the checkout cannot clash.
    """
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "var", "build", "dist", "*.egg-info", "__pycache__",
            ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "tests", "bench",
        ),
    )
    out = tmp_path / "wheels"
    result = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(out), str(source)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("txjournal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/txjournal_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    # A dropin.cache made on the build machine must not be shipped either.
    assert not [n for n in names if n.endswith("dropin.cache")]
    for module in ("txjournal/pb.py", "txjournal/tap.py", "txjournal/users.py",
                   "txjournal/cli.py", "txjournal/__main__.py"):
        assert module in names
