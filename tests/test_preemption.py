"""Stop signals (dakd_jax/interrupts.py): SIGTERM, a scheduler's preemption, ends a run in one
line with exit 143 after the training loop checkpointed its last step; the same command then
resumes and reaches the uninterrupted run's numbers.
"""
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import cli
from dakd_jax import interrupts
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


@pytest.mark.slow
def test_sigterm_mid_teacher_and_mid_student_then_resume_gives_the_uninterrupted_numbers(
    tmp_path):
  """Checkpoints only at each stage's end: what the stopped runs leave is the stop's own save."""
  overrides = tiny_overrides(str(tmp_path), **{
      "stage": "all", "teacher.epochs": 2, "teacher.steps_per_epoch": 8,
      "teacher.eval_every_epochs": 100, "distill.epochs": 2, "distill.steps_per_epoch": 8,
      "distill.eval_every_epochs": 100, "checkpoint.every_steps": 100,
      "eval.pictures": False, "data.num_workers": 0})
  straight = str(tmp_path / "straight")
  finish(run_py(overrides, straight))
  stopped = str(tmp_path / "stopped")
  for stage in ("teacher", "student"):
    code, output = _stop_when_logged(run_py(overrides, stopped),
                                     os.path.join(stopped, stage, "metrics.jsonl"), 3)
    checkpoints = os.path.join(stopped, stage, "checkpoints")
    saved = checkpoint_lib.complete_steps(checkpoints)
    assert code == 143, output[-3000:]
    assert len(saved) == 1 and 3 <= saved[0] < 16, (saved, output[-3000:])
    assert output.strip().splitlines()[-1] == (
        f"dakd_jax: stopped by SIGTERM: {stage} step {saved[0]} saved in {checkpoints}; run "
        "the same command again to resume from it")
  output = finish(run_py(overrides, stopped))
  assert f"resumed from {os.path.join(stopped, 'student', 'checkpoints')}" in output
  for stage in ("teacher", "student"):
    expected = restore_params(os.path.join(straight, stage, "checkpoints"), 16)
    resumed = restore_params(os.path.join(stopped, stage, "checkpoints"), 16)
    jax.tree.map(np.testing.assert_array_equal, expected, resumed)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_jsonl(
        os.path.join(d, stage, "metrics.jsonl")) if "loss" in r]
    assert losses(stopped) == losses(straight)
  results = lambda d: json.load(open(os.path.join(d, "eval", "results.json")))["results"]
  assert results(stopped) == results(straight)
