"""Stopping on a signal without losing work: SIGTERM (a scheduler's preemption) and SIGINT.

`cli.main_from_args` installs the handlers for the length of a run (`handle_stop_signals`).
A signal then raises `Stopped` wherever the main thread is, like Ctrl-C's KeyboardInterrupt,
except inside a `deferred()` block: the training loop runs each step and its checkpoint save in
one, so the signal waits for the step to end and the loop can checkpoint a consistent state
before the run ends (`train/loop.py`). `cli.report_stopped` prints one line and exits
128 + the signal number (143 for SIGTERM, 130 for SIGINT), what a scheduler records as killed.

Signal handlers belong to the process, so their state is a module-level singleton (`_STATE`);
nothing else reads it. Without the handlers (a notebook calling `run_stages`), `deferred()`
does nothing and Ctrl-C is Python's KeyboardInterrupt, which the loop treats the same way.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
  """The run was asked to stop by a signal. A BaseException, as KeyboardInterrupt is, so that
  `except Exception` clean-up code never swallows it.

  Attributes:
    signal_number: the signal (signal.SIGTERM, signal.SIGINT).
    saved: what was checkpointed on the way out ("teacher step 37 in <dir>"), "" when nothing.
  """

  def __init__(self, signal_number: int):
    super().__init__(signal.Signals(signal_number).name)
    self.signal_number = int(signal_number)
    self.saved = ""

  @property
  def exit_code(self) -> int:
    """The shell's code for a process ended by this signal: 128 + its number."""
    return 128 + self.signal_number


class _SignalState:
  """What the handlers need: how many deferred() blocks are open, the signal they hold back."""

  def __init__(self):
    self.deferring = 0
    self.pending: int | None = None


_STATE = _SignalState()


def _on_signal(signal_number: int, frame) -> None:
  del frame  # Where the signal landed does not matter: the exception carries the stop.
  if _STATE.deferring:
    _STATE.pending = signal_number  # Raised when the innermost deferred() block ends.
    return
  raise Stopped(signal_number)


@contextlib.contextmanager
def handle_stop_signals() -> Iterator[None]:
  """Within the block SIGTERM and SIGINT raise `Stopped` (held back by `deferred()`); the
  previous handlers come back afterwards. Outside the main thread (where Python cannot install
  handlers) it changes nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {number: signal.signal(number, _on_signal) for number in STOP_SIGNALS}
  try:
    yield
  finally:
    for number, handler in previous.items():
      signal.signal(number, handler)
    _STATE.pending = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds a stop signal back until the block ends, then raises `Stopped` (when the block
  itself did not raise). For work that must not be cut in the middle: a training step whose
  input state is donated, a checkpoint save."""
  _STATE.deferring += 1
  try:
    yield
  finally:
    _STATE.deferring -= 1
  if not _STATE.deferring and _STATE.pending is not None:
    pending, _STATE.pending = _STATE.pending, None
    raise Stopped(pending)


@contextlib.contextmanager
def ignored() -> Iterator[None]:
  """A block during which further stop signals are recorded and dropped: the checkpoint save
  on the way out after a first signal (a second SIGTERM must not cut it)."""
  _STATE.deferring += 1
  try:
    yield
  finally:
    _STATE.deferring -= 1
    if not _STATE.deferring:
      _STATE.pending = None
