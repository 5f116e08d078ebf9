"""
Property-based damage: random byte flips, truncations and zeroed ranges
anywhere in a data directory's journal segments and snapshots, then a
start-up.

A data directory is written once per module by the real service (bank
schema, several small segments, three snapshots), remembering the live
model after every command. Each example copies it, damages the copy and
starts a service on it. The only acceptable outcomes:

* start-up succeeds and the model equals the live model after *some*
  prefix of the commands, namely as many commands as the journal now holds
  (never a model that no prefix produced); when all the damage is in the
  final segment, that prefix holds every record before the first damaged
  byte (a torn tail loses only what follows it);
* start-up raises a txjournal error whose message names a file of the data
  directory, so the operator knows where to look.

Anything else (another exception type, a hang, a wrong model) fails.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from bankjournal import Built, build_bank, command_mix, files_of, materialize, start_bank, stop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txjournal import record as rec
from txjournal.errors import JournalCorrupt, RecoveryError, TxJournalError

COUNT = 60
SEGMENT_SIZE = 400
#: The newest snapshot lies in the final segment, so a torn tail can end
#: the journal before it (start-up must then refuse).
SNAPSHOTS = (20, 40, 58)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Template:
    built: Built
    files: dict[str, bytes]
    journal_files: list[str]
    snapshot_files: list[str]
    last_segment: str
    #: For the last segment: (end offset, seq) of each record in it.
    last_ends: list[tuple[int, int]]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    built = build_bank(
        tmp_path_factory.mktemp("template") / "bank",
        command_mix(COUNT, seed=7),
        segment_size=SEGMENT_SIZE,
        snapshot_after=SNAPSHOTS,
    )
    assert built.snapshots == list(SNAPSHOTS)
    files = files_of(built.datadir)
    journal_files = sorted(f for f in files if f.startswith("journal/"))
    snapshot_files = sorted(f for f in files if f.startswith("snapshots/"))
    assert len(journal_files) >= 6 and len(snapshot_files) == 3
    last = journal_files[-1]
    data = files[last]
    salt = rec.decode_segment_header(data).salt_bytes
    ends = []
    offset = rec.SEGMENT_HEADER_SIZE
    for _o, record in rec.iter_records(data, offset, salt):
        _r, offset = rec.decode_at(data, offset, salt)
        ends.append((offset, record.seq))
    assert ends and ends[-1] == (len(data), COUNT)
    return Template(built, files, journal_files, snapshot_files, last, ends)


def names_a_file(message: str, datadir: Path) -> bool:
    """Whether ``message`` names a file or directory inside ``datadir``."""
    return re.search(re.escape(str(datadir)) + r"/(journal|snapshots)\b", message) is not None


@dataclass(frozen=True)
class Damage:
    file: str
    kind: str  # "flip" | "truncate" | "zero"
    offset: int
    arg: int  # flip: xor mask; zero: length; truncate: unused

    def apply(self, data: bytes) -> tuple[bytes, int | None]:
        """The damaged bytes and the first offset that changed (``None``: no change)."""
        if not data:
            return data, None
        offset = self.offset % len(data)
        if self.kind == "truncate":
            return data[:offset], offset
        buf = bytearray(data)
        if self.kind == "flip":
            buf[offset] ^= self.arg
        else:
            buf[offset : offset + self.arg] = bytes(len(buf[offset : offset + self.arg]))
        changed = [i for i in range(offset, min(len(data), offset + max(1, self.arg))) if buf[i] != data[i]]
        return bytes(buf), (changed[0] if changed else None)


def damages(files: list[str]) -> st.SearchStrategy[list[Damage]]:
    one = st.builds(
        Damage,
        file=st.sampled_from(files),
        kind=st.sampled_from(["flip", "truncate", "zero"]),
        offset=st.integers(0, 1 << 16),
        arg=st.integers(1, 255),
    ).map(lambda d: d if d.kind != "zero" else Damage(d.file, d.kind, d.offset, 1 + d.arg % 64))
    return st.lists(one, min_size=1, max_size=3)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Where each example's damaged copy is made (emptied and rewritten per example)."""
    return tmp_path / "bank"


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Show a case count in the test run's output, past pytest's capture."""
    with capsys.disabled():
        print(line)


def check_start(template: Template, workdir: Path, plan: list[Damage], stats: Counter[str]) -> None:
    """Apply ``plan`` to a fresh copy, start, and check the outcome against the property."""
    files = dict(template.files)
    first_damage: dict[str, int] = {}
    for d in plan:
        files[d.file], at = d.apply(files[d.file])
        if at is not None:
            first_damage[d.file] = min(at, first_damage.get(d.file, at))
    materialize(files, workdir)
    try:
        svc = start_bank(workdir, segment_size=SEGMENT_SIZE)
    except TxJournalError as e:
        message = str(e)
        assert names_a_file(message, workdir), f"{type(e).__name__} does not name a file: {message}"
        stats[f"refused ({type(e).__name__})"] += 1
        return
    try:
        recovered = svc.engine.last_seq
        assert 0 <= recovered <= COUNT
        assert svc.model == template.built.models[recovered], (plan, recovered)
        if set(first_damage) == {template.last_segment}:
            # Damage only in the final segment: every record before it survives.
            at = first_damage[template.last_segment]
            intact = max(
                [seq for end, seq in template.last_ends if end <= at],
                default=int(template.last_segment.split("/")[1].split(".")[0]) - 1,
            )
            assert recovered >= intact, (plan, recovered, intact)
            stats["recovered (tail damage)"] += 1
        else:
            stats["recovered"] += 1
        if recovered < COUNT:
            stats["recovered a shorter prefix"] += 1
        if svc.loaded_snapshot_seq != max(SNAPSHOTS):
            stats["fell back to an older snapshot"] += 1
    finally:
        stop(svc)


def test_random_damage_gives_a_prefix_or_a_named_error(
    template: Template, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats: Counter[str] = Counter()

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(plan=damages(template.journal_files + template.snapshot_files))
    def run(plan: list[Damage]) -> None:
        check_start(template, workdir, plan, stats)

    run()
    total = sum(v for k, v in stats.items() if k.startswith(("recovered", "refused")) and "shorter" not in k)
    report(capsys, f"\ntest_corruption random damage: {total} cases: {dict(stats)}")
    assert stats["recovered"] + stats["recovered (tail damage)"] > 0
    assert any(k.startswith("refused") for k in stats)


def test_damage_in_the_final_segment_keeps_everything_before_it(
    template: Template, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The torn-tail case, aimed at: every damage lands in the last segment."""
    stats: Counter[str] = Counter()

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(plan=damages([template.last_segment]))
    def run(plan: list[Damage]) -> None:
        check_start(template, workdir, plan, stats)

    run()
    total = sum(v for k, v in stats.items() if k.startswith(("recovered", "refused")) and "shorter" not in k)
    report(capsys, f"\ntest_corruption final-segment damage: {total} cases: {dict(stats)}")
    assert stats["recovered (tail damage)"] > 0


def test_truncating_the_final_segment_recovers_exactly_what_is_left(
    template: Template, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A cut anywhere after the header of the final segment is a crash
    mid-write: start-up must succeed with exactly the records wholly before
    the cut, unless the cut goes below the newest snapshot, when it must
    refuse (starting from less would lose history the snapshot proves).
    """
    size = len(template.files[template.last_segment])
    newest = max(SNAPSHOTS)
    first_in_last = int(template.last_segment.split("/")[1].split(".")[0])
    outcomes: Counter[str] = Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cut=st.integers(rec.SEGMENT_HEADER_SIZE, size))
    def run(cut: int) -> None:
        files = dict(template.files)
        files[template.last_segment] = files[template.last_segment][:cut]
        materialize(files, workdir)
        kept = max([seq for end, seq in template.last_ends if end <= cut], default=first_in_last - 1)
        if kept < newest:
            # At a record boundary the journal simply ends too early; inside a
            # record, the partial record is one the snapshot proves was
            # acknowledged, so it is refused as damage and not cut off.
            with pytest.raises((RecoveryError, JournalCorrupt)) as info:
                start_bank(workdir, segment_size=SEGMENT_SIZE)
            if isinstance(info.value, JournalCorrupt):
                assert f"a snapshot covers sequence number {newest}" in str(info.value)
                assert (workdir / template.last_segment).stat().st_size == cut
            else:
                assert f"ends at sequence number {kept} but snapshot {newest}" in str(info.value)
            outcomes["refused: below the newest snapshot"] += 1
            return
        svc = start_bank(workdir, segment_size=SEGMENT_SIZE)
        try:
            assert svc.engine.last_seq == kept
            assert svc.model == template.built.models[kept]
        finally:
            stop(svc)
        outcomes["recovered exactly"] += 1

    run()
    report(capsys, f"\ntest_corruption final-segment cuts: {sum(outcomes.values())} cases: {dict(outcomes)}")
    assert outcomes["recovered exactly"] > 0


def test_recovery_error_names_its_files(template: Template, workdir: Path) -> None:
    """
    Found by the random-damage test (the message named no file; fixed in
    service.py since): cut the final segment right after its header, so the
    journal ends before snapshot 58. Refusing is right; the message must
    still say where to look, like every other start-up error.
    """
    files = dict(template.files)
    files[template.last_segment] = files[template.last_segment][: rec.SEGMENT_HEADER_SIZE]
    materialize(files, workdir)
    with pytest.raises(RecoveryError) as info:
        start_bank(workdir, segment_size=SEGMENT_SIZE)
    assert names_a_file(str(info.value), workdir), str(info.value)
