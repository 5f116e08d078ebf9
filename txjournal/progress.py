"""
Progress of long replays (``check``, ``rebuild``, ``replay``), for people.

Replaying years of history can take minutes; an operator staring at a
silent terminal cannot tell a slow replay from a hung one. The library
functions in :mod:`txjournal.history` only call a callback with
``(records done, records expected)``; this module turns those calls into a
bar on a terminal, or an occasional plain line when the output is a log
file (a bar's carriage returns would make a log unreadable), and into
nothing at all when asked to be quiet.

:func:`describe` is pure (it formats numbers it is given), so it is tested
without a terminal; :class:`ProgressBar` only decides when and where to
write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

#: Seconds between redraws of the terminal bar (redrawing is not free).
TTY_INTERVAL = 0.1
#: Seconds between plain lines when the stream is not a terminal.
LOG_INTERVAL = 10.0
BAR_WIDTH = 24


@dataclass(frozen=True)
class Snapshot:
    """
    Progress at one moment: ``done`` of ``total`` (``None``: unknown),
    ``elapsed`` seconds since the start.
    """

    done: int
    total: int | None
    elapsed: float

    @property
    def rate(self) -> float | None:
        """Records per second so far (``None`` before any time has passed)."""
        return self.done / self.elapsed if self.elapsed > 0 else None

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far, or ``None`` when it cannot be told."""
        rate = self.rate
        if self.total is None or not rate:
            return None
        return max(0, self.total - self.done) / rate


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe(state: Snapshot, label: str = "", width: int = BAR_WIDTH, bar: bool = True) -> str:
    """
    One line of text for ``state``: an optional ``[####....]`` bar, the
    percentage, ``done/total``, the rate and the time left.
    """
    parts = [label] if label else []
    fraction = state.fraction
    if fraction is not None:
        if bar:
            filled = int(fraction * width)
            parts.append("[" + "#" * filled + "." * (width - filled) + "]")
        parts.append(f"{fraction * 100:5.1f}%")
    total = f"/{state.total:,}" if state.total is not None else ""
    parts.append(f"{state.done:,}{total} records")
    rate = state.rate
    if rate is not None:
        parts.append(f"{rate:,.0f}/s")
    eta = state.eta
    if eta is not None and state.done < (state.total or 0):
        parts.append(f"ETA {_duration(eta)}")
    elif state.elapsed:
        parts.append(f"{_duration(state.elapsed)} elapsed")
    return "  ".join(parts)


class ProgressBar:
    """
    A progress callback for :mod:`txjournal.history` that writes to ``stream``.

    On a terminal (``stream.isatty()``) it redraws one line in place, at most
    every :data:`TTY_INTERVAL` seconds; otherwise it writes a plain line at
    most every ``log_interval`` seconds (``None``: never), so a short run
    into a pipe stays silent and a long one leaves a trace in its log.
    Call :meth:`finish` once the work is done to end the terminal line.

    :param clock: monotonic seconds; tests pass a fake one.
    """

    def __init__(
        self,
        stream: TextIO,
        label: str = "",
        *,
        tty: bool | None = None,
        log_interval: float | None = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.label = label
        if tty is None:
            isatty = getattr(stream, "isatty", None)
            tty = bool(isatty()) if isatty is not None else False
        self.tty = tty
        self.log_interval = log_interval
        self._clock = clock
        self._started = clock()
        self._last_write: float | None = None
        self._drawn = False
        self.last: Snapshot | None = None

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        state = Snapshot(done, total, now - self._started)
        self.last = state
        if self.tty:
            if self._last_write is not None and now - self._last_write < TTY_INTERVAL:
                return
            self._last_write = now
            # \r and erase-to-end-of-line: redraw in place, never scroll.
            self.stream.write("\r" + describe(state, self.label) + "\x1b[K")
            self.stream.flush()
            self._drawn = True
            return
        if self.log_interval is None:
            return
        if self._last_write is None:
            # The first plain line waits a whole interval: short runs stay quiet.
            self._last_write = self._started
        if now - self._last_write >= self.log_interval:
            self._last_write = now
            self.stream.write(describe(state, self.label, bar=False) + "\n")
            self.stream.flush()

    def finish(self) -> None:
        """End the terminal line (with the final figures), if one was drawn."""
        if self.tty and self._drawn:
            if self.last is not None:
                self.stream.write("\r" + describe(self.last, self.label) + "\x1b[K")
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
