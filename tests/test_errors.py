"""The error classes and the storage-failure translation (dakd_jax/errors.py), and how the
command line reports them (cli.report_error, cli.BackgroundFailures)."""
import errno
import os
import sys
import threading

import pytest

from dakd_jax import cli
from dakd_jax import errors

FIX = "choose another folder (--workdir)"


def test_error_classes_are_user_errors_and_the_builtins_callers_catch():
  assert issubclass(errors.StorageError, errors.UserError)
  assert issubclass(errors.StorageError, OSError)
  assert issubclass(errors.MissingExtraError, errors.UserError)
  assert issubclass(errors.MissingExtraError, ImportError)
  assert issubclass(errors.ConfigError, ValueError)


@pytest.mark.parametrize("code, reason", [
    (errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
    (errno.EACCES, "Permission denied"), (errno.EDQUOT, "Disk quota exceeded"),
    (errno.EFBIG, "File too large")])
def test_storage_error_names_what_where_why_and_the_fix(code, reason):
  error = OSError(code, os.strerror(code), "/runs/a/teacher/checkpoints/4")
  storage = errors.storage_error(error, "checkpoint in /runs/a/teacher/checkpoints")
  assert str(storage) == (
      f"cannot write the checkpoint in /runs/a/teacher/checkpoints "
      f"(/runs/a/teacher/checkpoints/4): {reason}. Free disk space or fix the folder's "
      f"permissions, or {FIX}")


def test_storage_error_finds_the_cause_inside_library_errors():
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/data/tfds/x.array_record")
    except OSError as inner:
      raise RuntimeError("shard writer failed") from inner
  except RuntimeError as outer:
    wrapped = outer
  storage = errors.storage_error(wrapped, "prepared data in /data/tfds", "use another disk")
  assert str(storage) == ("cannot write the prepared data in /data/tfds "
                          "(/data/tfds/x.array_record): No space left on device. Free disk "
                          "space or fix the folder's permissions, or use another disk")
  # tensorstore's errors carry the reason in their text only.
  text_only = ValueError('OUT_OF_RANGE: Error writing "params" at "/c/4": Failed to write 10 '
                         "bytes: File too large [os_error_code='27']")
  assert str(errors.storage_error(text_only, "checkpoint in /c")).startswith(
      "cannot write the checkpoint in /c: File too large.")


def test_other_failures_are_not_storage_errors():
  assert errors.storage_error(OSError(errno.ENOENT, "No such file or directory", "/x"),
                              "x") is None
  assert errors.storage_error(ValueError("shapes do not match"), "x") is None
  cycle = ValueError("a")
  cycle.__context__ = ValueError("b")
  cycle.__context__.__context__ = cycle  # A context loop must not hang the search.
  assert errors.storage_error(cycle, "x") is None


def test_writing_translates_storage_failures_and_passes_the_rest():
  with pytest.raises(errors.StorageError) as caught:
    with errors.writing("config /runs/a/config.json"):
      raise OSError(errno.EROFS, "Read-only file system", "/runs/a/config.json")
  assert str(caught.value).startswith("cannot write the config /runs/a/config.json "
                                      "(/runs/a/config.json): Read-only file system.")
  assert isinstance(caught.value.__cause__, OSError)
  config_error = errors.ConfigError("config.seed = -1")
  with pytest.raises(errors.ConfigError) as caught:
    with errors.writing("x"):
      raise config_error
  assert caught.value is config_error
  with pytest.raises(KeyError):
    with errors.writing("x"):
      raise KeyError("a bug stays a bug")


def test_check_writable_folder(tmp_path, monkeypatch):
  folder = tmp_path / "run" / "teacher" / "checkpoints"
  errors.check_writable_folder(str(folder), "checkpoint in " + str(folder))
  assert folder.is_dir() and os.listdir(folder) == []  # the probe file is gone
  blocker = tmp_path / "notes.txt"
  blocker.write_text("mine")
  with pytest.raises(errors.StorageError) as caught:
    errors.check_writable_folder(str(blocker / "teacher"), "checkpoint in x")
  assert str(caught.value) == (f"cannot write the checkpoint in x: {blocker} is a file, not a "
                               f"folder. Move it away, or {FIX}")
  assert blocker.read_text() == "mine"

  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", path)

  monkeypatch.setattr(os, "makedirs", read_only)
  with pytest.raises(errors.StorageError, match=rf"\({tmp_path}/other\): Read-only file system"):
    errors.check_writable_folder(str(tmp_path / "other"), "metrics")


def test_report_error_prints_one_line_and_reraises_bugs(capsys):
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/w/x")
  assert cli.report_error(wrapped, verbose=False) == cli.EXIT_RUN
  assert capsys.readouterr().err == (
      "dakd_jax: error: cannot write the output files (/w/x): No space left on device. Free "
      f"disk space or fix the folder's permissions, or {FIX}\n")
  assert cli.report_error(errors.ConfigError("config.seed = -1"), verbose=False) == \
      cli.EXIT_CONFIG
  assert capsys.readouterr().err == "dakd_jax: invalid config: config.seed = -1\n"
  with pytest.raises(ZeroDivisionError):
    cli.report_error(ZeroDivisionError("a bug"), verbose=False)


def test_background_failures_keep_storage_errors_of_threads_quiet(monkeypatch):
  reported = []  # What Python's default hook (replaced here) would have printed.
  monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))

  def fail(error):
    def target():
      raise error
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()

  bug = KeyError("a bug in a thread")
  with cli.BackgroundFailures(verbose=False) as background:
    fail(OSError(errno.ENOSPC, "No space left on device", "/w/events"))
    fail(bug)
  assert reported == [bug]  # a bug keeps its report; the full disk is kept for the message
  assert [str(e).split(":")[0] for e in background.found] == [
      "cannot write the files written in the background (/w/events)"]
  assert threading.excepthook is not background._hook  # restored on exit


def test_background_failures_hide_only_the_closed_event_loop_noise(monkeypatch):
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", lambda args: reported.append(str(args.exc_value)))

  class Noisy:
    def __init__(self, error):
      self.error = error

    def __del__(self):
      raise self.error

  with cli.BackgroundFailures(verbose=False):
    Noisy(RuntimeError("Event loop is closed"))  # Collected at once: an unraisable error.
    Noisy(RuntimeError("something else"))
  with cli.BackgroundFailures(verbose=True):
    Noisy(RuntimeError("Event loop is closed"))
  assert reported == ["something else", "Event loop is closed"]
