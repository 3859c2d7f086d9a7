"""One writer per folder: the lock a run holds on its workdir (or the folder it writes into).

Two runs writing one workdir overwrite each other's checkpoints and evaluations (Orbax fails
mid-save, or a run reports a step another run wrote). `hold_lock(folder)` takes an exclusive
`fcntl.flock` on `<folder>/.lock` for the whole run and writes who holds it there (pid, host,
start time). The kernel drops the lock when the process ends in any way, kill -9 included, so
a lock left by a dead run never blocks: the next run takes it and says so in one line. On a
normal end the file is emptied; non-empty contents with a free lock mean the holder died.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Iterator

from dakd_jax import errors

LOCK_NAME = ".lock"


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another run holds the folder's lock; the message names it and how to go on."""


def lock_path(folder: str) -> str:
  """Where the lock of `folder` lives."""
  return os.path.join(folder, LOCK_NAME)


def describe_holder(holder: dict) -> str:
  """'pid 123 on host, since 2026-12-06 16:40:01 UTC' from the lock file's contents."""
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
          f"{holder.get('since', '?')}")


def _read_holder(handle) -> dict:
  handle.seek(0)
  text = handle.read().strip()
  try:
    holder = json.loads(text) if text else {}
  except ValueError:
    holder = {}
  return holder if isinstance(holder, dict) else {}


def _write_holder(handle, holder: dict) -> None:
  handle.seek(0)
  handle.truncate()
  if holder:
    handle.write(json.dumps(holder))
  handle.flush()


@contextlib.contextmanager
def hold_lock(folder: str, what: str = "workdir", flag: str = "--workdir") -> Iterator[dict]:
  """Holds `folder`'s lock while the block runs; yields this run's holder record.

  Args:
    folder: the folder the run writes (created when missing).
    what, flag: how messages name the folder and the option that chooses another.
  Raises:
    WorkdirBusyError: another live process holds the lock (one line naming its pid, host and
      start, and what to do).
    StorageError: the folder or its lock file cannot be written.
  Prints one line on stderr when it takes over the lock of a run that died without releasing it.
  """
  path = lock_path(folder)
  with errors.writing(f"lock file {path}", fix=f"choose another folder ({flag})"):
    os.makedirs(folder, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(handle)
      raise WorkdirBusyError(
          f"{what} {folder} is in use by another run ({describe_holder(holder)}); wait for it "
          f"to end or stop it (kill {holder.get('pid', '<pid>')}), or give this run another "
          f"{flag}") from None
    previous = _read_holder(handle)
    if previous:
      print(f"dakd_jax: taking over the lock of {what} {folder} left by a run that ended "
            f"without releasing it ({describe_holder(previous)})", file=sys.stderr, flush=True)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).strftime(
                  "%Y-%m-%d %H:%M:%S UTC")}
    with errors.writing(f"lock file {path}", fix=f"choose another folder ({flag})"):
      _write_holder(handle, holder)
    try:
      yield holder
    finally:
      with contextlib.suppress(OSError):  # A full disk must not hide the run's own error.
        _write_holder(handle, {})
      fcntl.flock(handle, fcntl.LOCK_UN)
  finally:
    handle.close()
