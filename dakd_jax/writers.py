"""Where metrics go: TensorBoard events, a JSON-lines file and a progress line.

The last stop of the data flow. One `MetricWriter` is created at start and passed down to the
training loop and the evaluators; it writes only from process 0 (other processes hold a writer
that does nothing), so callers never branch on the process index. `ProgressLine` is the
human-facing line, cut to the terminal's width: redrawn in place on a terminal, plain throttled
lines when the output is a file or a CI log. A full or read-only disk ends in one
`StorageError` naming the file.

Values reach the host only here, at logging intervals: `write_scalars` and the progress line
fetch a whole dict with one `jax.device_get`.
"""
import io
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dakd_jax import errors
from dakd_jax.progress import format_duration  # Also this module's public name.


def _import_summary_writer():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX.writer imports torch
  when it is installed (about 2 s per process) only to accept torch tensors, and only floats
  are logged here. Where torch is already imported nothing changes; afterwards `import torch`
  works as usual."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _import_summary_writer()

RESERVED_KEYS = ("step", "stage", "wall_time")
JSONL_NAME = "metrics.jsonl"


def _host_scalars(scalars: Mapping[str, Any]) -> dict[str, float | int]:
  """Fetches a dict of scalars in one transfer, in the caller's key order.

  Integers and booleans stay int/bool, the rest become float.

  Raises:
    ValueError: a value holds more than one element.
  """
  names = list(scalars)  # a list keeps the caller's order (dict pytrees are sorted)
  fetched = jax.device_get([scalars[name] for name in names])
  out = {}
  for name, value in zip(names, fetched):
    array = np.asarray(value)
    if array.size != 1:
      raise ValueError(f"metric {name!r} has shape {array.shape}; only scalars can be logged")
    item = array.reshape(()).item()
    out[str(name)] = item if isinstance(item, (bool, int)) else float(item)
  return out


def _json_number(value: float | int) -> float | int | str:
  """Non-finite floats become "NaN"/"Infinity"/"-Infinity" so every line is strict JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  return value


class MetricWriter:
  """TensorBoard events plus `metrics.jsonl` in the workdir, written by process 0 only.

  Each `write_scalars` call appends one JSON object
  {"step": int, "stage": str, "wall_time": unix seconds, "<name>": value, ...} and one
  TensorBoard scalar per name under the tag "<stage>/<name>" ("<name>" when stage is "").
  A file that cannot be written (full disk, read-only folder) raises StorageError naming it.
  """

  def __init__(self, workdir: str | os.PathLike, *, stage: str = "",
               enabled: bool | None = None, jsonl_name: str = JSONL_NAME,
               flush_secs: int = 30):
    """Opens the files (creating `workdir`) when enabled.

    Args:
      workdir: the run's directory; event files and `jsonl_name` are written directly in it.
      stage: default stage name ("teacher", "student", "eval"); settable as `writer.stage`.
      enabled: None = `jax.process_index() == 0`; False writes nothing anywhere.
      jsonl_name: file name of the JSON-lines log (appended to, so a resumed run continues it).
      flush_secs: longest time TensorBoard events stay buffered.
    """
    self.stage = stage
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self.workdir = os.fspath(workdir)
    self._tensorboard = None
    self._jsonl = None
    self._what = f"metrics in {self.workdir} ({jsonl_name}, TensorBoard events)"
    if self.enabled:
      with errors.writing(self._what):
        os.makedirs(self.workdir, exist_ok=True)
        self._jsonl = open(os.path.join(self.workdir, jsonl_name), "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(logdir=self.workdir, flush_secs=flush_secs)

  def _tag(self, name: str, stage: str) -> str:
    return f"{stage}/{name}" if stage else name

  def _append(self, record: dict) -> None:
    with errors.writing(self._what):
      self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
      # A line per logging interval is cheap; flushing keeps the file whole after a crash.
      self._jsonl.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *,
                    stage: str | None = None) -> None:
    """Logs scalar metrics of one step.

    Args:
      step: the global step the values belong to.
      scalars: name -> scalar (Python number, NumPy or jax.Array of size 1).
      stage: overrides `self.stage` for this call.

    Raises:
      ValueError: a name is one of RESERVED_KEYS or a value is not a scalar.
    """
    if not self.enabled:
      return
    clash = sorted(set(scalars) & set(RESERVED_KEYS))
    if clash:
      raise ValueError(f"metric names {clash} are reserved for the JSON-lines record; rename them")
    stage = self.stage if stage is None else stage
    values = _host_scalars(scalars)
    wall_time = time.time()
    for name, value in values.items():
      self._tensorboard.add_scalar(self._tag(name, stage), value, int(step), walltime=wall_time)
    record = {"step": int(step), "stage": stage, "wall_time": wall_time}
    record.update({name: _json_number(value) for name, value in values.items()})
    self._append(record)

  def flush(self) -> None:
    """Writes buffered events to disk."""
    if self.enabled:
      with errors.writing(self._what):
        self._tensorboard.flush()
        self._jsonl.flush()

  def close(self) -> None:
    """Flushes and closes the files; later writes are errors."""
    if self.enabled and self._jsonl is not None:
      jsonl, self._jsonl = self._jsonl, None
      with errors.writing(self._what):
        try:
          self._tensorboard.close()
        finally:
          jsonl.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def drop_rows_after(path: str, step: int) -> int:
  """Removes the records of steps after `step` from a JSON-lines log (a run resumed at `step`
  logs them again), keeping the file's order; returns how many were dropped. A missing file or
  a line that is not JSON (a write cut short by a kill) is handled: the latter is dropped.
  Raises StorageError when the file cannot be rewritten."""
  if not os.path.isfile(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if int(record.get("step", 0)) <= step:
      kept.append(line)
  if len(kept) != len(lines):
    temporary = f"{path}.tmp"
    with errors.writing(f"metrics log {path}"):
      with open(temporary, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
      os.replace(temporary, path)
  return len(lines) - len(kept)


def device_memory_bytes(device: Any = None) -> tuple[int, int] | None:
  """(bytes in use, peak bytes) of a device (default: the first local one), None when it
  reports no statistics (CPU). The peak is the allocator's high-water mark since the process
  started, the number to compare with the device's capacity."""
  try:
    stats = (device or jax.local_devices()[0]).memory_stats()
  except Exception:  # pylint: disable=broad-except  # some backends raise instead of None
    return None
  if not stats or "bytes_in_use" not in stats:
    return None
  return stats["bytes_in_use"], stats.get("peak_bytes_in_use", stats["bytes_in_use"])


def device_memory_text(device: Any = None) -> str:
  """Returns "mem <in use>/<peak> GiB" (`device_memory_bytes`), "" without statistics."""
  memory = device_memory_bytes(device)
  if memory is None:
    return ""
  gib = 1024 ** 3
  return f"mem {memory[0] / gib:.1f}/{memory[1] / gib:.1f} GiB"


class ProgressLine:
  """A stage's progress as one line that fits the terminal.

  The line leads with the stage, step/total, the loss, images/s and the ETA (the steps left at
  the recent rate, plus the caller's estimate of the other work left); device memory (on
  accelerators), the other loss terms, the epoch, step and data time follow, as many as fit in
  `width`
  columns (`shutil.get_terminal_size`, 80 when unknown; metrics.jsonl holds every term).

  On a terminal the line is redrawn in place at most every `min_interval_s` (default 0.5 s);
  `clear()` blanks it before other output (an evaluation table, another bar) and `close()`
  prints it once, for good, when the stage ends. Otherwise (a file, a CI log) it prints one
  line at most every `min_interval_s` (default 10 s), plus the first update and the last step,
  and `close()` adds nothing. Rates are averaged over the steps since the previous line;
  `restart_clock`, called once the first step has compiled, keeps compilation out of them.
  """

  def __init__(self, total_steps: int, *, stage: str = "", steps_per_epoch: int | None = None,
               start_step: int = 0, stream: io.TextIOBase | None = None,
               use_tty: bool | None = None, min_interval_s: float | None = None,
               show_memory: bool = True, clock: Callable[[], float] = time.monotonic,
               width: int | None = None, on_line: Callable[[], None] | None = None):
    """Starts the line (nothing is printed yet).

    Args:
      total_steps: the stage's last step.
      stage: shown first ("teacher", "student").
      steps_per_epoch: when given, the epoch shown is ceil(step / steps_per_epoch).
      start_step: the step training starts from (non-zero after a resume).
      stream: where to write; default sys.stderr.
      use_tty: None = `stream.isatty()`.
      min_interval_s: least time between two renders (see class docstring for defaults).
      show_memory: append the first local device's memory use when it reports one.
      clock: seconds, monotonic; replaceable in tests.
      width: columns available; None = the terminal's at each render (80 when unknown).
      on_line: called after each plain line (e.g. `progress.Heartbeat.touch`).
    """
    self.total_steps = int(total_steps)
    self.stage = stage
    self.steps_per_epoch = steps_per_epoch
    self._stream = stream or sys.stderr
    if use_tty is None:
      use_tty = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._use_tty = bool(use_tty)
    self._min_interval = (0.5 if use_tty else 10.0) if min_interval_s is None else min_interval_s
    self._show_memory = show_memory
    self._clock = clock
    self._width = width
    self._last_step = int(start_step)
    self._text = ""  # The last rendered line.
    self._shown = 0  # Characters of the in-place line now on the terminal.
    self._must_render = True  # The next update renders whatever the interval.
    self._other_seconds_left = 0.0
    self._on_line = on_line
    self.restart_clock(start_step)

  def restart_clock(self, step: int) -> None:
    """Measures rates from now, as if at `step`: call it when the first step has compiled."""
    self._render_step, self._render_time = int(step), self._clock()
    self._images, self._data_time = 0, 0.0

  def is_due(self, at_least_s: float = 10.0) -> bool:
    """Whether a line is owed: `at_least_s` seconds (or the render interval, if longer) have
    passed since the last one. The loop then fetches the losses early, so a slow step never
    leaves a log silent until the next logging interval."""
    return self._clock() - self._render_time >= max(at_least_s, self._min_interval)

  def update(self, step: int, metrics: Mapping[str, Any], images: int, *,
             data_time: float = 0.0, epoch: int | None = None,
             other_seconds_left: float = 0.0) -> str | None:
    """Records progress up to `step` and re-renders when the interval has passed.

    Args:
      step: steps completed so far in this stage.
      metrics: name -> scalar loss terms (host or device values; fetched only when rendered).
      images: images processed since the previous `update` call.
      data_time: seconds spent waiting for input since the previous `update` call.
      epoch: shown instead of the epoch derived from steps_per_epoch.
      other_seconds_left: time the stage still needs besides its steps (the teacher's memory
        rebuilds, the evaluations to come), added to the ETA.

    Returns:
      The rendered text when a render happened, else None.
    """
    self._images += int(images)
    self._data_time += float(data_time)
    self._last_step = int(step)
    now = self._clock()
    if not (self._must_render or step >= self.total_steps
            or now - self._render_time >= self._min_interval):
      return None
    # A line without a rate yet ("ETA ?") is followed by one with it as soon as a step ran.
    self._must_render = step <= self._render_step
    self._other_seconds_left = float(other_seconds_left)
    self._text = self._render(now, metrics, epoch)
    if self._use_tty:
      self._stream.write("\r" + self._text.ljust(self._shown))
      self._stream.flush()
      self._shown = len(self._text)
    else:
      print(self._text, file=self._stream, flush=True)
      if self._on_line is not None:
        self._on_line()
    return self._text

  def columns(self) -> int:
    """Characters a line may use: the width less one, so a terminal never wraps it."""
    width = self._width or shutil.get_terminal_size((80, 24)).columns
    return max(width - 1, 20)

  def _render(self, now: float, metrics: Mapping[str, Any], epoch: int | None) -> str:
    steps = self._last_step - self._render_step
    elapsed = max(now - self._render_time, 1e-9)
    values = _host_scalars(metrics)
    lead = [f"{self.stage} step {self._last_step}/{self.total_steps}".strip()]
    if "loss" in values:
      lead.append(f"loss {values.pop('loss'):.4g}")
    tail = []
    if self._show_memory and (memory := device_memory_text()):
      tail.append(memory)  # First of the optional parts: on a GPU it matters most.
    tail += [f"{name} {value:.4g}" for name, value in values.items()]
    if epoch is None and self.steps_per_epoch:
      epoch = max(1, math.ceil(self._last_step / self.steps_per_epoch))
    if epoch is not None:
      epochs = f"/{math.ceil(self.total_steps / self.steps_per_epoch)}" \
          if self.steps_per_epoch else ""
      tail.append(f"ep {epoch}{epochs}")
    if steps > 0:
      step_time = elapsed / steps
      steps_left_s = (self.total_steps - self._last_step) * step_time
      lead += [f"{self._images / elapsed:.1f} img/s",
               f"ETA {format_duration(steps_left_s + self._other_seconds_left)}"]
      tail.append(f"step {step_time:.3f}s data {self._data_time / steps:.3f}s")
    else:  # Nothing ran since the clock restarted: no rate yet.
      lead += ["? img/s", "ETA ?"]
    self.restart_clock(self._last_step)
    return fit_parts(lead, tail, self.columns())

  def clear(self) -> None:
    """Blanks the in-place line on a terminal, so that other output starts on a clean line;
    the next update redraws it. A file keeps its lines (nothing to do)."""
    if self._use_tty and self._shown:
      self._stream.write("\r" + " " * self._shown + "\r")
      self._stream.flush()
      self._shown = 0
      self._must_render = True

  def close(self) -> None:
    """Ends the stage's line: on a terminal the last line is printed once, for good; a file
    already has it. Later calls print nothing."""
    if self._use_tty and self._text:
      self._stream.write("\r" + self._text.ljust(self._shown) + "\n")
      self._stream.flush()
    self._text, self._shown = "", 0


def fit_parts(lead: list[str], tail: list[str], columns: int, separator: str = " | ") -> str:
  """`lead` joined by `separator`, then `tail` parts in order while they fit in `columns`.

  The lead is always kept (cut at `columns` if it alone is longer); the first tail part that
  does not fit ends the line, so what is shown keeps its order.
  """
  text = separator.join(lead)
  for part in tail:
    if len(text) + len(separator) + len(part) > columns:
      break
    text += separator + part
  return text[:columns]
