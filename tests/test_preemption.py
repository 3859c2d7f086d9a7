"""Stop signals (dakd_jax/interrupts.py): SIGTERM, a scheduler's preemption, ends a run in one
line with exit 143 after the training loop checkpointed its last step; the same command then
resumes and reaches the uninterrupted run's numbers.
"""
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import cli
from dakd_jax import interrupts
from tests import tiny
from tests.test_train import finish, read_jsonl, restore_params, run_py, tiny_overrides


def test_deferred_block_holds_a_signal_until_it_ends():
  with interrupts.handle_stop_signals():
    reached = []
    with pytest.raises(interrupts.Stopped) as stopped:
      with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("after the signal")  # The block runs on to its end.
    assert reached == ["after the signal"]
    assert stopped.value.exit_code == 143
    with pytest.raises(interrupts.Stopped) as stopped:  # Outside a block: at once.
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    assert stopped.value.exit_code == 130
    with interrupts.ignored():  # A second signal while saving on the way out is dropped.
      os.kill(os.getpid(), signal.SIGTERM)
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # Handlers restored.


def test_sigterm_during_stage_eval_exits_143_in_one_line(tmp_path, monkeypatch, capsys):
  """The evaluation stage used to end with status 0 and no word on SIGTERM."""
  def evaluating(config, workdir):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # The handler raises before this ends.
    raise AssertionError("SIGTERM did not stop the stage")
  monkeypatch.setattr(cli, "start", evaluating)
  code = cli.main_from_args(["--config=configs/demo.py", "--config.stage=eval"], str(tmp_path))
  assert code == 143
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == ["dakd_jax: stopped by SIGTERM: each stage keeps its last saved checkpoint; "
                   "run the same command again to resume from it"]


def _stop_when_logged(process, metrics_path, step):
  """SIGTERM to `process` once `metrics_path` logs a training step >= `step`."""
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    if os.path.isfile(metrics_path) and any(
        '"loss"' in line and json.loads(line)["step"] >= step
        for line in open(metrics_path).read().splitlines() if line.endswith("}")):
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  output, _ = process.communicate(timeout=600)
  return process.returncode, output


# Checkpoints only at each stage's end: what a stopped run leaves is the stop's own save.
# The shared tiny run (tests/tiny.py: 16 steps per training stage).
RUN = {"stage": "all", "teacher.eval_every_epochs": 100, "distill.eval_every_epochs": 100,
       "checkpoint.every_steps": 100, "eval.pictures": False, "data.num_workers": 0}
STEPS = tiny.TEACHER_STEPS
assert tiny.STUDENT_STEPS == STEPS


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """The uninterrupted run every interrupted run of this module is compared with: (data
  folder, workdir). Saving cadence and loader workers do not change the numbers (the step is
  the data position), so one reference serves runs that differ in those."""
  tmp = str(tmp_path_factory.mktemp("preemption"))
  workdir = os.path.join(tmp, "straight")
  finish(run_py(tiny_overrides(tmp, **RUN), workdir))
  return tmp, workdir


def logged_losses(workdir, stage):
  return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(workdir, stage,
                                                                  "metrics.jsonl"))
          if "loss" in r]


@pytest.mark.slow
def test_sigterm_mid_teacher_and_mid_student_then_resume_gives_the_uninterrupted_numbers(
    straight_run):
  tmp, straight = straight_run
  overrides = tiny_overrides(tmp, **RUN)
  stopped = os.path.join(tmp, "stopped")
  for stage in ("teacher", "student"):
    code, output = _stop_when_logged(run_py(overrides, stopped),
                                     os.path.join(stopped, stage, "metrics.jsonl"), 3)
    checkpoints = os.path.join(stopped, stage, "checkpoints")
    saved = checkpoint_lib.complete_steps(checkpoints)
    assert code == 143, output[-3000:]
    assert len(saved) == 1 and 3 <= saved[0] < STEPS, (saved, output[-3000:])
    assert output.strip().splitlines()[-1] == (
        f"dakd_jax: stopped by SIGTERM: {stage} step {saved[0]} saved in {checkpoints}; run "
        "the same command again to resume from it")
  output = finish(run_py(overrides, stopped))
  assert f"resumed from {os.path.join(stopped, 'student', 'checkpoints')}" in output
  for stage in ("teacher", "student"):
    expected = restore_params(os.path.join(straight, stage, "checkpoints"), STEPS)
    resumed = restore_params(os.path.join(stopped, stage, "checkpoints"), STEPS)
    jax.tree.map(np.testing.assert_array_equal, expected, resumed)
    assert logged_losses(stopped, stage) == logged_losses(straight, stage)
  results = lambda d: json.load(open(os.path.join(d, "eval", "results.json")))["results"]
  assert results(stopped) == results(straight)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(straight_run):
  """Killed (no handler runs, nothing saved on the way out) mid-teacher with two loader worker
  processes and a checkpoint every step, resumed with none: the resumed run sees the
  uninterrupted run's batches and reaches its weights."""
  tmp, straight = straight_run
  overrides = tiny_overrides(tmp, **dict(RUN, **{
      "stage": "teacher", "checkpoint.every_steps": 1, "checkpoint.keep_last": 10}))
  killed = os.path.join(tmp, "killed")
  process = run_py(overrides + ["--config.data.num_workers=2"], killed)
  checkpoints = os.path.join(killed, "teacher", "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline and not any(
      s >= 3 for s in checkpoint_lib.complete_steps(checkpoints)):
    time.sleep(0.2)
  # `kill -9` of the main process alone: its loader workers end with it (pipeline.
  # end_with_parent), so the output pipe closes. Else they would run on holding it open.
  process.send_signal(signal.SIGKILL)
  try:
    process.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)  # run_py's own process group: the orphans too.
    raise AssertionError("the killed run's loader workers outlived it by 60 s")
  interrupted_at = max(checkpoint_lib.complete_steps(checkpoints))
  assert 3 <= interrupted_at < STEPS, interrupted_at
  output = finish(run_py(overrides, killed))
  assert f"resumed from {checkpoints} step {interrupted_at}" in output
  # The logged losses are the uninterrupted run's, step for step, and metrics.jsonl holds
  # each step once, in order: the rows logged after the restored step by the killed process
  # are dropped on resume.
  assert logged_losses(killed, "teacher") == logged_losses(straight, "teacher")
  assert [step for step, _ in logged_losses(killed, "teacher")] == list(range(1, STEPS + 1))
  expected = restore_params(os.path.join(straight, "teacher", "checkpoints"), STEPS)
  resumed = restore_params(checkpoints, STEPS)
  jax.tree.map(np.testing.assert_array_equal, expected, resumed)
