"""Progress of a long loop: a tqdm bar on a terminal, regular INFO lines everywhere else.

tqdm writing to a file redraws its bar behind carriage returns, so a log file gets one line tens of
thousands of characters long, and no line a reader or `grep` can find the step, the metrics or the
ETA in. `progress(...)` is a drop-in for `tqdm(...)`: when stderr is a terminal (or a notebook runs it)
it *is* tqdm; otherwise it logs one INFO line on `rlhf.progress` after the first step, every `every`
steps (about LINES_PER_LOOP lines a loop) but no closer than MIN_INTERVAL_S seconds apart (a fast loop
is not worth a line a batch), at least every INTERVAL_S seconds (a slow loop still shows it is alive),
and at the end:

    sft 120/912 (13%) train_loss=1.234 val_loss=1.456 | 2.31 step/s, elapsed 0:52, ETA 5:43

When nothing has configured logging (a Python script run into a file), the `rlhf` logger's own handler
(rlhf/__init__.py) prints the lines to stderr.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

log = logging.getLogger("rlhf.progress")

LINES_PER_LOOP = 20  # ours: a loop's lines fit on one screen of the log
INTERVAL_S = 60.0  # ours: the longest a log goes without a line while a loop runs
MIN_INTERVAL_S = 2.0  # ours: the shortest time between two lines (but the first and last)
EVERY_WITHOUT_TOTAL = 100  # steps between lines when the loop's length is unknown


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty (a wrapper), or a closed stream
        return False


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, every: int | None = None, **tqdm_kwargs: Any):
    """`tqdm(iterable, total=, desc=, unit=, initial=, **tqdm_kwargs)` on a terminal, else a `LogProgress`
    (same iteration, `set_postfix`, `update` and `close`) logging a line every `every` steps."""
    if _is_terminal(sys.stderr) or "ipykernel" in sys.modules:  # a notebook shows tqdm's widget
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, **tqdm_kwargs)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, every=every)


def format_duration(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour (tqdm's format)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())  # no carriage return or newline can reach the log


class LogProgress:
    """tqdm's interface as log lines: iterate it (or call `update`), `set_postfix` the live metrics."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, every: int | None = None, interval_s: float = INTERVAL_S,
                 min_interval_s: float = MIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # as tqdm: the iterable's length, not counting `initial`
        if every is None:
            every = math.ceil(total / LINES_PER_LOOP) if total else EVERY_WITHOUT_TOTAL
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.every, self.interval_s, self.min_interval_s, self.clock = every, interval_s, min_interval_s, clock
        self.postfix: dict[str, str] = {}
        self.start_t = self.last_line_t = clock()
        self.last_line_n: int | None = None
        self.closed = False

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item  # the loop body runs here, so a line logged below carries its postfix
            self.update()
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Replace the metrics shown on the next line (numbers as tqdm shows them, to 3 significant digits)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = {k: f"{v:.3g}" if isinstance(v, float) else _one_line(v) for k, v in items.items()}

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = {"": _one_line(s)} if s else {}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        since_line = now - self.last_line_t
        if (self.n == self.initial + n  # the first step: the loop runs, and what a step costs
                or (self.n % self.every == 0 and since_line >= self.min_interval_s) or since_line >= self.interval_s):
            self._line(now)

    def close(self) -> None:
        """Log the final line (unless the last step already has one)."""
        if not self.closed and self.last_line_n != self.n:
            self._line(self.clock())
        self.closed = True

    def format_line(self, now: float) -> str:
        elapsed = now - self.start_t
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0  # this session's steps only
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        metrics = " ".join(f"{k}={v}" if k else v for k, v in self.postfix.items())
        speed = (f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}") if rate > 0 else "?"
        timing = f"{speed}, elapsed {format_duration(elapsed)}"
        if self.total:
            eta = format_duration(max(self.total - self.n, 0) / rate) if rate > 0 else "?"
            timing += f", ETA {eta}"
        return _one_line(" ".join(part for part in (self.desc, count, metrics, "|", timing) if part))

    def _line(self, now: float) -> None:
        line = self.format_line(now)
        log.info("%s", line)  # unconfigured logging still shows it: rlhf/__init__.py's stderr handler
        self.last_line_t, self.last_line_n = now, self.n
