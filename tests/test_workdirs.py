"""Workdirs that are safe to share and move (issue 24): one writer per workdir, a writable
workdir checked before any work, a copied workdir that resumes, evaluates and exports."""
import os
import signal
import subprocess
import sys
import time

import pytest

from dakd_jax import cli
from dakd_jax import workdir_lock
from tests.test_cli import one_error_line, read_only_folder, run_py, tiny_args, data_dir  # noqa: F401  pylint: disable=unused-import

HOLD = ("import sys, time\n"
        "from dakd_jax import workdir_lock\n"
        "with workdir_lock.hold_lock(sys.argv[1]):\n"
        "  print('held', flush=True)\n"
        "  time.sleep(float(sys.argv[2]))\n")


def start_holder(folder, seconds=120):
  """A separate process holding `folder`'s lock; returns once it holds it."""
  process = subprocess.Popen([sys.executable, "-c", HOLD, folder, str(seconds)],
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert process.stdout.readline().strip() == "held"
  return process


def test_a_second_run_in_a_used_workdir_stops_at_once_naming_the_other(tmp_path):
  workdir = str(tmp_path / "run")
  holder = start_holder(workdir)
  try:
    result = run_py([f"--workdir={workdir}", "--config.stage=eval"])
    line = one_error_line(result, f"pid {holder.pid}", "in use by another run",
                          f"kill {holder.pid}", "another --workdir")
    assert "since 20" in line and " UTC" in line
    # Reading commands stay possible: export and extract write and lock their own subfolder.
    assert cli.written_folder(_config("export"), workdir)[0] == os.path.join(workdir, "export")
    with workdir_lock.hold_lock(os.path.join(workdir, "export")):
      pass
  finally:
    holder.kill()
    holder.wait()


def _config(stage):
  from dakd_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config("configs/demo.py", [f"stage={stage}"], validate_config=False)


def test_a_lock_left_by_a_killed_run_is_taken_over_in_one_line(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  holder = start_holder(workdir)
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {holder.pid}"):
    with workdir_lock.hold_lock(workdir):
      pass
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  with workdir_lock.hold_lock(workdir) as mine:
    assert mine["pid"] == os.getpid()
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and "taking over" in lines[0] and f"pid {holder.pid}" in lines[0]
  # Released normally: the file is emptied, so the next run says nothing.
  assert open(workdir_lock.lock_path(workdir)).read() == ""
  with workdir_lock.hold_lock(workdir):
    pass
  assert capsys.readouterr().err == ""


def test_the_lock_is_released_when_the_run_fails(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(ZeroDivisionError):
    with workdir_lock.hold_lock(workdir):
      raise ZeroDivisionError
  holder = start_holder(workdir, seconds=0)  # Another process takes it at once.
  holder.wait()


def test_a_read_only_workdir_is_refused_before_any_work(tmp_path):
  workdir = read_only_folder(str(tmp_path / "run"))
  started = time.monotonic()
  result = run_py([f"--workdir={workdir}", "--config.stage=eval"], restriction="permissions")
  one_error_line(result, "cannot write the workdir", workdir, "Permission denied")
  # Stopped before the dataset was generated, prepared or anything evaluated.
  assert "preparing" not in result.stderr and "stage=eval" not in result.stdout
  assert time.monotonic() - started < 60
