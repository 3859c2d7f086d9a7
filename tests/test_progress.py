"""Long phases are never silent in a log file (dakd_jax/progress.py), and the training ETA
counts the memory rebuilds and evaluations still to come (train/loop.py)."""
import io
import re
import time

import pytest

from dakd_jax import progress
from dakd_jax import writers
from dakd_jax.data import synthetic
from dakd_jax.train import loop


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_plain_lines_at_the_interval_with_rate_and_eta():
  clock, stream = FakeClock(), io.StringIO()
  shown = progress.Progress(100, "extract query", unit="images", stream=stream, use_tty=False,
                            every_s=30, clock=clock)
  clock.now += 10
  shown.update(20)  # 10 s < 30 s: nothing yet.
  assert stream.getvalue() == ""
  clock.now += 30
  shown.update(20)  # 40 images in 40 s: 1/s, 60 left -> 60 s.
  assert stream.getvalue().splitlines() == [
      "dakd_jax: extract query: 40/100 images (40%) | 1.0 images/s | elapsed 0:00:40 | "
      "ETA 0:01:00"]
  clock.now += 5
  shown.update(60)  # 5 s after the last line: nothing.
  shown.close()
  assert stream.getvalue().splitlines()[1:] == [
      "dakd_jax: extract query: done, 100 images in 0:00:45"]


def test_a_short_phase_stays_quiet_and_a_disabled_one_prints_nothing():
  clock, stream = FakeClock(), io.StringIO()
  with progress.Progress(10, "quick", stream=stream, use_tty=False, every_s=30,
                         clock=clock) as shown:
    shown.update(10)
  with progress.Progress(10, "off", stream=stream, use_tty=False, every_s=0.001,
                         enabled=False, clock=clock) as shown:
    clock.now += 1
    shown.update(10)
  assert stream.getvalue() == ""


@pytest.mark.parametrize("text", ["0", "-1", "soon", "nan"])
def test_a_bad_interval_variable_is_named(monkeypatch, text):
  monkeypatch.setenv(progress.EVERY_S_VARIABLE, text)
  with pytest.raises(ValueError, match="DAKD_PROGRESS_EVERY_S"):
    progress.plain_interval_s()


def test_synthetic_generation_prints_progress_lines_into_a_log(tmp_path, monkeypatch, capsys):
  """A real slow phase with its output captured (not a terminal) and a tiny interval."""
  monkeypatch.setenv(progress.EVERY_S_VARIABLE, "1e-6")
  synthetic.ensure_synthetic(str(tmp_path / "sysu"), "sysu", num_train_ids=3, num_val_ids=1,
                             num_test_ids=2, images_per_camera=1, height=32, width=16,
                             show_progress=True)
  lines = capsys.readouterr().err.splitlines()
  counted = [int(m.group(1)) for line in lines if (m := re.match(
      r"dakd_jax: generating synthetic sysu persons: (\d+)/6 persons \(\d+%\) \| [\d.]+ "
      r"persons/s \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$", line))]
  assert counted == [1, 2, 3, 4, 5, 6]
  assert re.fullmatch(r"dakd_jax: generating synthetic sysu persons: done, 6 persons in "
                      r"\d+:\d\d:\d\d", lines[-1])


def test_progress_line_is_due_after_the_interval():
  clock = FakeClock()
  line = writers.ProgressLine(10, stream=io.StringIO(), use_tty=False, min_interval_s=10,
                              clock=clock)
  clock.now += 9
  assert not line.is_due(at_least_s=5)  # The render interval (10 s) is longer.
  clock.now += 1
  assert line.is_due(at_least_s=5)


def test_training_eta_adds_rebuilds_and_evaluations_to_come():
  clock, stream = FakeClock(), io.StringIO()
  line = writers.ProgressLine(40, stage="teacher", stream=stream, use_tty=False, clock=clock,
                              width=200, show_memory=False)
  clock.now += 10
  line.update(10, {"loss": 1.0}, 100, other_seconds_left=75)  # 30 steps x 1 s + 75 s.
  assert "ETA 0:01:45" in stream.getvalue()
  # 4 epochs of 10 steps, evaluated after epochs 2 and 4: after step 10, epoch starts at steps
  # 10, 20, 30 and evaluations after epochs 2 and 4 remain; after step 20 (its evaluation not
  # run yet), 2 starts and 2 evaluations; after step 21, 1 and 1.
  stage = loop.Stage(name="teacher", epochs=4, steps_per_epoch=10,
                     eval_due=lambda epoch: epoch % 2 == 0, step_fn=None, on_epoch_start=None)
  seconds = {"epoch_start": 3.0, "evaluation": 20.0}
  assert loop._other_seconds_left(stage, 10, seconds) == 3 * 3 + 2 * 20
  assert loop._other_seconds_left(stage, 20, seconds) == 2 * 3 + 2 * 20
  assert loop._other_seconds_left(stage, 21, seconds) == 1 * 3 + 1 * 20
  assert loop._other_seconds_left(stage, 40, seconds) == 0 * 3 + 1 * 20


def test_heartbeat_names_the_current_step_at_the_interval_and_ends_its_lines():
  stream = io.StringIO()
  with progress.heartbeat("export", stream=stream, use_tty=False, every_s=0.05) as beat:
    beat.step("ONNX conversion")
    time.sleep(0.5)
    beat.step("verification")
    time.sleep(0.5)
  lines = stream.getvalue().splitlines()
  steps = [re.fullmatch(r"dakd_jax: export: (.*) \| elapsed 0:00:0[01]", line)
           for line in lines[:-1]]
  assert all(steps), lines
  names = [match[1] for match in steps]
  # In order, each step while it lasted (a few beats each; the thread may miss one).
  assert names == sorted(names, key=["ONNX conversion", "verification"].index)
  assert names.count("ONNX conversion") >= 2 and names.count("verification") >= 2
  assert re.fullmatch(r"dakd_jax: export: done in 0:00:0[01]", lines[-1])
  after = len(stream.getvalue())
  time.sleep(0.15)
  assert len(stream.getvalue()) == after  # The thread stopped with the phase.


def test_a_short_heartbeat_a_terminal_or_a_disabled_one_prints_nothing():
  for options in ({"use_tty": False, "every_s": 10.0}, {"use_tty": True, "every_s": 0.01},
                  {"use_tty": False, "every_s": 0.01, "enabled": False}):
    stream = io.StringIO()
    with progress.heartbeat("export", stream=stream, **options) as beat:
      beat.step("ONNX conversion")
      time.sleep(0.1)
    assert stream.getvalue() == "", options


def test_heartbeat_fills_only_the_silences_and_keeps_quiet_for_a_sub_phase():
  stream = io.StringIO()
  with progress.heartbeat("teacher", stream=stream, use_tty=False, every_s=0.1) as beat:
    beat.step("step 1/9 running")
    for _ in range(8):  # Another line every 0.04 s: no silence of 0.1 s, no heartbeat.
      time.sleep(0.04)
      beat.touch()
    assert stream.getvalue() == ""
    beat.step(None)  # A sub-phase with lines of its own.
    time.sleep(0.35)
    assert stream.getvalue() == ""
    beat.step("step 2/9 running")  # Its silence counts from here.
    time.sleep(0.05)
    assert stream.getvalue() == ""
    time.sleep(0.3)
  lines = stream.getvalue().splitlines()
  assert len(lines) >= 3 and all(
      re.fullmatch(r"dakd_jax: teacher: step 2/9 running \| elapsed 0:00:0\d", line)
      for line in lines[:-1]), lines
  assert lines[-1].startswith("dakd_jax: teacher: done in ")


class _Sink:
  """A checkpoint manager and a metric writer that keep nothing."""

  def save(self, *args, **kwargs):
    del args, kwargs

  def write_scalars(self, *args):
    del args


def test_training_steps_slower_than_the_pace_get_heartbeat_lines_between_their_lines(
    monkeypatch):
  """A step that takes 0.35 s with a 0.1 s pace: the log hears of the running step (the first
  one as compiling) between the steps' own lines, in the loop as it runs (the stage's final
  evaluation is replaced by a quiet one)."""
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from dakd_jax import sharding as sharding_lib
  from dakd_jax.train import saving

  def slow_step(state, batch):
    del batch
    time.sleep(0.35)
    return state, {"loss": jnp.float32(1.0)}

  stage = loop.Stage(name="teacher", epochs=1, steps_per_epoch=2, eval_due=lambda epoch: False,
                     step_fn=slow_step, on_epoch_start=lambda state, epoch: state)
  config = ml_collections.ConfigDict({
      "log": {"every_steps": 1}, "checkpoint": {"every_steps": 100, "select": "last"},
      "data": {"ids_per_batch": 1, "images_per_id": 1}})
  batch = {"visible": np.zeros((1, 2, 2, 3), np.uint8), "infrared": np.zeros((1, 2, 2, 3),
                                                                           np.uint8),
           "labels": np.zeros((1,), np.int32)}
  stream = io.StringIO()
  beat = progress.Heartbeat("teacher", stream=stream, use_tty=False, every_s=0.1)
  line = writers.ProgressLine(2, stage="teacher", stream=stream, use_tty=False,
                              show_memory=False, width=200, on_line=beat.touch)
  out = saving.Outputs(_Sink(), _Sink(), line, beat)
  monkeypatch.setattr(loop, "_evaluate_step", lambda stage, config, evaluator, out, position:
                      out.heartbeat.step(None))
  position = saving.Position(0, {"w": jnp.zeros(2)}, {})
  try:
    loop._train_steps(stage, config, iter([batch, batch]), sharding_lib.make_mesh(), None, out,
                      position, "fingerprint")
  finally:
    beat.close()
  lines = stream.getvalue().splitlines()
  while lines and lines[0].startswith("dakd_jax: teacher: starting | elapsed"):
    lines = lines[1:]  # The heartbeat was made before the loop (mesh, iterator) began.
  kinds = ["beat 1" if "step 1/2 running (compiling first) | elapsed" in text else
           "beat 2" if "step 2/2 running | elapsed" in text else
           "line 1" if text.startswith("teacher step 1/2") else
           "line 2" if text.startswith("teacher step 2/2") else text for text in lines]
  assert kinds[-1].startswith("dakd_jax: teacher: done in "), lines
  order = [kind for kind in kinds[:-1] if kind in ("beat 1", "line 1", "beat 2", "line 2")]
  assert order == sorted(order, key=["beat 1", "line 1", "beat 2", "line 2"].index), lines
  assert set(order) == {"beat 1", "line 1", "beat 2", "line 2"}, lines
  assert len(order) == len(kinds) - 1, lines  # nothing else was printed
