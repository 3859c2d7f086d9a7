"""The mistakes a user can make, as exception classes, in one place.

Everything a user controls - a config field, a dataset folder, a weights file, a checkpoint, the
disk a run writes to - fails with a subclass of `UserError` whose message names the file or the
field, the value seen and the fix. `cli.main` prints such a message as one line on stderr and
exits non-zero; any other exception is a bug and keeps its traceback. Each class also derives
from the built-in exception callers would naturally catch (ValueError, FileNotFoundError, ...).
"""
from __future__ import annotations

import errno


class UserError(Exception):
  """A problem with the user's input or environment; the message says how to fix it."""


class ConfigError(UserError, ValueError):
  """A config field has a bad value; the message names the field and the fix."""


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


# OSError numbers that mean "the user's disk or folder", not a bug.
STORAGE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT")
    if hasattr(errno, name))
# Text of storage failures that libraries (tensorstore, Orbax) wrap into other exceptions.
STORAGE_MESSAGES = ("No space left on device", "Read-only file system", "Permission denied",
                    "Disk quota exceeded")


def storage_error(error: BaseException, what: str) -> StorageError | None:
  """A StorageError describing `error` when it is a full/read-only/forbidden write, else None.

  Args:
    error: any exception raised while writing (an OSError, or a library error wrapping one).
    what: what was being written, e.g. "checkpoint in /work/run/teacher/checkpoints".
  """
  cause = error
  while cause is not None:
    if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
      where = f" ({cause.filename})" if cause.filename else ""
      return StorageError(f"cannot write the {what}{where}: {cause.strerror}. Free disk space, "
                          "fix the folder's permissions or choose another folder "
                          "(--workdir, --config.data.prepared_dir)")
    if any(text in str(cause) for text in STORAGE_MESSAGES):
      reason = next(text for text in STORAGE_MESSAGES if text in str(cause))
      return StorageError(f"cannot write the {what}: {reason}. Free disk space, fix the "
                          "folder's permissions or choose another folder (--workdir, "
                          "--config.data.prepared_dir)")
    cause = cause.__cause__ or cause.__context__
  return None
