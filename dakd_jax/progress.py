"""Progress of long phases that are not training steps: synthetic generation, data preparation,
the teacher's memory rebuild, extraction, evaluation, export.

On a terminal a tqdm bar is redrawn in place, as before. When the output is a file or a
scheduler's log, a redrawn bar is noise and nothing at all looks like a hang, so `Progress`
prints a plain line at a steady pace instead:

  dakd_jax: extract query: 3200/10000 images (32%) | 41.5 images/s | elapsed 0:01:17 | ETA 0:02:44

at most every `DAKD_PROGRESS_EVERY_S` seconds (environment variable, default 30), and one
closing line ("done") only when the phase printed any (short phases stay quiet). Training steps
have their own line (`writers.ProgressLine`). A phase made of a few opaque calls (an export's
conversion and verification) has no items to count: `heartbeat` prints its current step and the
elapsed time at the same pace from a background thread.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, TextIO

import tqdm

EVERY_S_VARIABLE = "DAKD_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0


def plain_interval_s() -> float:
  """Seconds between two plain progress lines: $DAKD_PROGRESS_EVERY_S, else 30.

  Raises:
    ValueError: the variable is set but not a positive number.
  """
  text = os.environ.get(EVERY_S_VARIABLE, "")
  if not text:
    return DEFAULT_EVERY_S
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value > 0 or not math.isfinite(value):
    raise ValueError(f"{EVERY_S_VARIABLE}={text!r}: give a positive number of seconds")
  return value


def format_duration(seconds: float) -> str:
  """Formats seconds as "H:MM:SS" (hours unbounded), "?" when not finite."""
  if not math.isfinite(seconds):
    return "?"
  total = int(round(max(seconds, 0.0)))
  return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


class Progress:
  """Progress over `total` items of one phase: a tqdm bar on a terminal, else plain lines.

  Use `update(count)` as items finish and `close()` at the end (or as a context manager).
  """

  def __init__(self, total: int, description: str, *, unit: str = "items",
               enabled: bool = True, stream: TextIO | None = None,
               use_tty: bool | None = None, every_s: float | None = None,
               clock: Callable[[], float] = time.monotonic):
    """Args:
      total: items in the phase.
      description: what is done ("extract query", "memory: visible").
      unit: the items' name in plain lines.
      enabled: False shows nothing anywhere (another process than 0, progress switched off).
      stream: where to write; default sys.stderr.
      use_tty: None = `stream.isatty()`.
      every_s: least seconds between plain lines; None = `plain_interval_s()`.
      clock: monotonic seconds; replaceable in tests.
    """
    self.total, self.description, self.unit = int(total), description, unit
    self.done = 0
    self._stream = stream or sys.stderr
    if use_tty is None:
      use_tty = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._enabled = enabled
    self._bar = None
    if enabled and use_tty:
      self._bar = tqdm.tqdm(total=self.total, desc=description, unit=f" {unit}", leave=False,
                            file=self._stream, mininterval=2.0)
    self._plain = enabled and not use_tty
    self._every_s = plain_interval_s() if every_s is None else every_s
    self._clock = clock
    self._started = self._last_line = clock()
    self._printed = False

  def update(self, count: int = 1) -> None:
    """Records `count` more items done; prints a plain line when the interval has passed."""
    self.done += int(count)
    if self._bar is not None:
      self._bar.update(count)
    elif self._plain and self._clock() - self._last_line >= self._every_s:
      self._print(self.line())

  def line(self) -> str:
    """The plain line for now: done/total, percent, rate, elapsed and ETA."""
    elapsed = max(self._clock() - self._started, 1e-9)
    rate = self.done / elapsed
    left = (self.total - self.done) / rate if rate > 0 else math.inf
    percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
    return (f"dakd_jax: {self.description}: {self.done}/{self.total} {self.unit}{percent} | "
            f"{rate:.1f} {self.unit}/s | elapsed {format_duration(elapsed)} | "
            f"ETA {format_duration(left)}")

  def _print(self, text: str) -> None:
    print(text, file=self._stream, flush=True)
    self._last_line, self._printed = self._clock(), True

  def close(self) -> None:
    """Ends the phase: removes the bar, or prints a closing line when plain lines were shown."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self._printed:
      elapsed = self._clock() - self._started
      self._print(f"dakd_jax: {self.description}: done, {self.done} {self.unit} in "
                  f"{format_duration(elapsed)}")
      self._printed = False

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def track(items: Iterable, total: int, description: str, *, unit: str = "items",
          enabled: bool = True, **options) -> Iterator:
  """Yields `items`, counting each one as done with a `Progress` (options go to it)."""
  with Progress(total, description, unit=unit, enabled=enabled, **options) as progress:
    for item in items:
      yield item
      progress.update(1)


class Heartbeat:
  """The current step of a phase without countable items, e.g. "export: ONNX conversion".

  When plain lines are due (output not a terminal), a background thread prints

    dakd_jax: export: ONNX conversion | elapsed 0:01:30

  every `every_s` seconds while the phase lasts, and one closing line ("done") only when it
  printed any. On a terminal, or when disabled, it prints nothing. Use `step(name)` as the
  phase moves on and `close()` at the end (or `heartbeat(...)` as a context manager).

  Beside a phase's own lines (training steps, whose line comes once per step however slow),
  it fills only the silences: `touch()` says a line was just printed, and the next heartbeat
  comes `every_s` after it; `step(None)` keeps it quiet while a sub-phase prints its own
  progress lines (a memory rebuild, an evaluation).
  """

  def __init__(self, description: str, *, enabled: bool = True, stream: TextIO | None = None,
               use_tty: bool | None = None, every_s: float | None = None):
    self.description, self.current = description, "starting"
    self._stream = stream or sys.stderr
    if use_tty is None:
      use_tty = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._every_s = plain_interval_s() if every_s is None else every_s
    self._started = self._last_line = time.monotonic()
    self._printed = False
    self._stop = threading.Event()
    self._thread = None
    if enabled and not use_tty:
      self._thread = threading.Thread(target=self._beat, name=f"heartbeat {description}",
                                      daemon=True)
      self._thread.start()

  def step(self, name: str | None) -> None:
    """The phase is now doing `name` (shown in the following lines); None: a sub-phase that
    prints its own lines (no heartbeat until the next step)."""
    if name is not None and self.current is None:  # Its silence counts from the sub-phase's end.
      self._last_line = time.monotonic()
    self.current = name

  def touch(self) -> None:
    """Another line was printed just now: the next heartbeat is due `every_s` from now."""
    self._last_line = time.monotonic()

  def _elapsed(self) -> str:
    return format_duration(time.monotonic() - self._started)

  def _beat(self) -> None:
    while not self._stop.wait(max(self._last_line + self._every_s - time.monotonic(), 0.01)):
      current = self.current
      if current is None or time.monotonic() - self._last_line < self._every_s:
        if current is None:
          self._last_line = time.monotonic()
        continue
      print(f"dakd_jax: {self.description}: {current} | elapsed {self._elapsed()}",
            file=self._stream, flush=True)
      self._last_line, self._printed = time.monotonic(), True

  def close(self) -> None:
    """Stops the lines; prints the closing line when any was printed."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    if self._printed:
      print(f"dakd_jax: {self.description}: done in {self._elapsed()}", file=self._stream,
            flush=True)


@contextlib.contextmanager
def heartbeat(description: str, **options) -> Iterator[Heartbeat]:
  """A `Heartbeat` for the `with` block (options go to it)."""
  beat = Heartbeat(description, **options)
  try:
    yield beat
  finally:
    beat.close()
