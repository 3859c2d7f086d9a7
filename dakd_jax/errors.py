"""The mistakes a user can make, as exception classes, in one place.

Everything a user controls - a config field, a dataset folder, a weights file, a checkpoint, the
disk a run writes to - fails with a subclass of `UserError` whose message names the file or the
field, the value seen and the fix. `cli.main` prints such a message as one line on stderr and
exits non-zero; any other exception is a bug and keeps its traceback. Each class also derives
from the built-in exception callers would naturally catch (ValueError, FileNotFoundError, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import numbers
import os
import tempfile
from typing import Iterator


class UserError(Exception):
  """A problem with the user's input or environment; the message says how to fix it."""


class ConfigError(UserError, ValueError):
  """A config field has a bad value; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Bounds:
  """An interval of accepted numbers, declared once by the settings that use the value.

  low, high: the ends; None = unbounded. low_inclusive, high_inclusive: whether an end is
  accepted. Booleans, non-numbers and non-finite numbers are never accepted.
  """
  low: float | None = None
  high: float | None = None
  low_inclusive: bool = True
  high_inclusive: bool = True

  def __str__(self) -> str:
    left = "[" if self.low_inclusive and self.low is not None else "("
    right = "]" if self.high_inclusive and self.high is not None else ")"
    low = "-inf" if self.low is None else self.low
    high = "inf" if self.high is None else self.high
    return f"{left}{low}, {high}{right}"

  def holds(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
        or not math.isfinite(value):
      return False
    if self.low is not None and (value < self.low if self.low_inclusive else value <= self.low):
      return False
    return self.high is None or (value <= self.high if self.high_inclusive
                                 else value < self.high)


class SettingError(ValueError):
  """A settings dataclass refused one of its fields (a bug when it reaches the user: builders
  turn it into a ConfigError naming the config field the value came from).

  owner: the settings class; field: its field (a part of a pair as "name[0]"); value: the value
  refused; allowed: what would be accepted, as text.
  """

  def __init__(self, owner: str, field: str, value, allowed: str):
    self.owner, self.field, self.value, self.allowed = owner, field, value, allowed
    super().__init__(f"{owner}.{field} must be in {allowed}, got {value!r}")


def check_bounds(owner: str, field: str, value, bounds: Bounds) -> None:
  """Raises SettingError unless `value` is a number within `bounds`."""
  if not bounds.holds(value):
    raise SettingError(owner, field, value, str(bounds))


class DatasetError(UserError, ValueError):
  """Bad or missing dataset files; the message names the path and what was expected."""


class WeightsError(UserError, ValueError):
  """A weights file that cannot be imported; the message names the file/parameter and the fix."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that does not fit the run (another stage, architecture or config)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the run needs (weights, features, images) that does not exist."""


class CheckpointNotFoundError(MissingFileError):
  """A checkpoint that is named (or needed) but does not exist."""


class NonFiniteLossError(UserError, FloatingPointError):
  """A loss term became NaN or infinite; the message names the step and the terms."""


class ExportError(UserError, RuntimeError):
  """A deployment export that cannot be written or does not reproduce the model."""


class StorageError(UserError, OSError):
  """A file that cannot be written: full disk, read-only folder, missing permission."""


class InsufficientMemoryError(UserError, MemoryError):
  """A training step that cannot fit in the device's (or host's) memory, found at start-up;
  the message gives what it needs, what there is and the settings that reduce it."""


class MissingExtraError(UserError, ImportError):
  """An optional package (an extra of pyproject.toml, or torch) that a requested feature needs;
  the message names the install command."""


# OSError numbers that mean "the user's disk or folder", not a bug. EFBIG: a file size limit
# (ulimit -f, a quota) stops the write as a full disk would.
STORAGE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT", "EFBIG")
    if hasattr(errno, name))
# Text of storage failures that libraries (tensorstore, Orbax) wrap into other exceptions.
STORAGE_MESSAGES = ("No space left on device", "Read-only file system", "Permission denied",
                    "Disk quota exceeded", "File too large")
DEFAULT_STORAGE_FIX = "choose another folder (--workdir)"


def storage_error(error: BaseException, what: str,
                  fix: str = DEFAULT_STORAGE_FIX) -> StorageError | None:
  """A StorageError describing `error` when it is a full/read-only/forbidden write, else None.

  Args:
    error: any exception raised while writing (an OSError, or a library error wrapping one,
      found through `__cause__`/`__context__`).
    what: what was being written, e.g. "checkpoint in /work/run/teacher/checkpoints".
    fix: the last part of the advice, e.g. "choose another folder (--config.data.prepared_dir)".
  Returns:
    StorageError("cannot write the <what> (<file>): <reason>. Free disk space or fix the
    folder's permissions, or <fix>"), one line; None when `error` is not a storage failure.
  """
  cause, seen = error, set()
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    reason = None
    if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
      reason = cause.strerror or os.strerror(cause.errno)
      where = f" ({cause.filename})" if cause.filename else ""
    else:
      text = str(cause)
      reason = next((message for message in STORAGE_MESSAGES if message in text), None)
      where = ""
    if reason is not None:
      return StorageError(f"cannot write the {what}{where}: {reason}. Free disk space or fix "
                          f"the folder's permissions, or {fix}")
    cause = cause.__cause__ or cause.__context__
  return None


@contextlib.contextmanager
def writing(what: str, fix: str = DEFAULT_STORAGE_FIX) -> Iterator[None]:
  """Turns a storage failure inside the block into `storage_error(error, what, fix)`.

  Other exceptions (user errors included) pass through unchanged. Use around every write to a
  user's folder: the workdir, the prepared data, the dataset root.
  """
  try:
    yield
  except UserError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # re-raised unless storage.
    storage = storage_error(error, what, fix)
    if storage is None:
      raise
    raise storage from error


def check_writable_folder(path: str, what: str, fix: str = DEFAULT_STORAGE_FIX) -> None:
  """Creates folder `path` if needed and proves a file can be written in it.

  Raises StorageError naming `what` when the folder cannot be created or written (read-only,
  full, forbidden) or when a file stands where the folder or one of its parents should be.
  """
  blocking = file_in_the_way(path)
  if blocking is not None:
    raise StorageError(f"cannot write the {what}: {blocking} is a file, not a folder. Move it "
                       f"away, or {fix}")
  with writing(what, fix):
    os.makedirs(path, exist_ok=True)
    try:
      handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
      try:
        os.write(handle, b"0")
      finally:
        os.close(handle)
        os.remove(probe)
    except OSError as error:  # Name the folder, not the probe file.
      raise OSError(error.errno, error.strerror, path) from error


def file_in_the_way(path: str) -> str | None:
  """The nearest existing ancestor of `path` (or `path` itself) when it is not a folder, else
  None: what stops `os.makedirs(path)`."""
  current = os.path.abspath(path)
  while not os.path.exists(current):
    parent = os.path.dirname(current)
    if parent == current:
      return None
    current = parent
  return None if os.path.isdir(current) else current
