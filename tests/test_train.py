"""Training: schedules, compiled steps, non-finite handling, and whole runs through run.py.

The whole-run tests call `run.py` in a subprocess on a small synthetic tree, as a user would,
with a width-8 ResNet-18 at 96x48 (the last stage stays 6x3 for XLA:CPU's fast path).
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax import builders
from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import cli
from dakd_jax import config as config_lib
from dakd_jax import errors
from dakd_jax import writers
from dakd_jax.evaluation import evaluator as evaluator_lib
from dakd_jax.train import finite
from dakd_jax.train import loop
from dakd_jax.train import state as state_lib
from dakd_jax.train import steps as steps_lib
from dakd_jax.losses import memory as memory_lib

from tests import tiny
from tests import xla_flags
from tests.test_cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(tmp_dir, **extra):
  """The shared tiny run's arguments (tests/tiny.py)."""
  return tiny.overrides(tmp_dir, **extra)


def run_py(args, workdir, env_extra=None, cwd=REPO):
  """run.py with the demo config in a subprocess; `workdir` may be relative to `cwd`. In a
  process group of its own, as a scheduler's job: `os.killpg` ends it with its loader
  workers."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
  return subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"),
                           "--config=" + os.path.join(REPO, "configs", "demo.py"),
                           f"--workdir={workdir}", *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)


def finish(process, timeout=900):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-4000:]
  return output


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def restore_params(checkpoint_dir, step):
  """The raw saved state of a step as numpy (no target: structure as saved)."""
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  state = checkpointer.restore(os.path.join(checkpoint_dir, str(step), "state"))
  return jax.tree.map(np.asarray, state["params"])


def test_teacher_schedule_matches_method_by_hand():
  config = config_lib.load_config("configs/sysu.py", validate_config=False)
  schedule = builders.teacher_learning_rate(config, steps_per_epoch=10)
  base = 3.5e-4
  # epoch 0 -> base/10, epoch 4 -> base/2, 10..20 base (strict > at D1 = 20), 21..39 0.1 base.
  expected = {0: base / 10, 9: base / 10, 45: base / 2, 100: base, 209: base, 200: base,
              210: 0.1 * base, 399: 0.1 * base, 400: 0.01 * base, 1599: 0.01 * base}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step


def _tiny_model_and_batch(n=4, height=48, width=48, classes=5):
  # Without non-local blocks (a third less to compile): what is checked here is the step's
  # compiling and state, not the network.
  config = config_lib.load_config("configs/demo.py", {"model.width": 4, "model.non_local": False,
                                                      "data.image_height": height,
                                                      "data.image_width": width},
                                  validate_config=False)
  model = builders.model_from_config(config)
  rng = np.random.default_rng(0)
  batch = {"visible": rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8),
           "infrared": rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8),
           "labels": np.array([0, 0, 1, 1][:n], np.int32)}
  return config, model, batch


@pytest.mark.slow
def test_teacher_step_compiles_once_and_moves_memories():
  config, model, batch = _tiny_model_and_batch()
  variables = builders.init_model_variables(config, model, jax.random.key(0))
  tx = builders.make_teacher_optimizer(config, steps_per_epoch=5)
  dim = variables["params"]["bnneck"]["scale"].shape[0]
  rng = np.random.default_rng(1)
  centres = [memory_lib.unit_rows(jnp.asarray(rng.normal(size=(5, dim)), jnp.float32))
             for _ in range(3)]
  state = state_lib.create_state(variables, tx, jax.random.key(1),
                                 memory_lib.init_memories(*centres))
  traces = []
  step = steps_lib.make_teacher_step(model, tx, builders.teacher_settings(config),
                                     builders.augment_views(config, "teacher"),
                                     hard_momentum=0.1, mean_momentum=0.25)

  def counted(state, batch):
    traces.append(1)  # Runs only while tracing.
    return step(state, batch)

  compiled = jax.jit(counted)
  before = np.asarray(state.memories.visible)
  for offset in range(3):
    shifted = {k: (np.roll(v, offset, axis=0) if k != "labels" else v) for k, v in batch.items()}
    state, metrics = compiled(state, shifted)
  assert len(traces) == 1
  assert int(state.step) == 3
  assert np.isfinite(float(metrics["loss"]))
  after = np.asarray(state.memories.visible)
  # Classes 0 and 1 were in every batch and moved; classes 2..4 were never seen and did not.
  assert not np.allclose(after[:2], before[:2])
  np.testing.assert_array_equal(after[2:], before[2:])
  np.testing.assert_array_equal(np.asarray(state.memories.snapshot_visible), before)


@pytest.mark.slow
def test_student_step_trains_only_student_and_compiles_once():
  config, model, batch = _tiny_model_and_batch()
  teacher_vars = builders.init_model_variables(config, model, jax.random.key(2))
  student_vars = builders.init_model_variables(config, model, jax.random.key(3))
  dim = teacher_vars["params"]["bnneck"]["scale"].shape[0]
  rng = np.random.default_rng(4)
  centres = [memory_lib.unit_rows(jnp.asarray(rng.normal(size=(5, dim)), jnp.float32))
             for _ in range(2)]
  teacher = steps_lib.FrozenTeacher(teacher_vars, *centres)
  tx = builders.make_student_optimizer(config)
  state = state_lib.create_state(student_vars, tx, jax.random.key(5))
  traces = []
  step = steps_lib.make_student_step(model, tx, builders.distill_settings(config),
                                     builders.augment_views(config, "student"))

  def counted(state, teacher, batch):
    traces.append(1)
    return step(state, teacher, batch)

  compiled = jax.jit(counted)
  teacher_before = jax.tree.map(np.asarray, teacher.variables)
  student_before = jax.tree.map(np.asarray, state.params)
  for _ in range(2):
    state, metrics = compiled(state, teacher, batch)
  assert len(traces) == 1
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  jax.tree.map(np.testing.assert_array_equal, teacher_before,
               jax.tree.map(np.asarray, teacher.variables))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), student_before,
                         state.params)
  assert any(jax.tree.leaves(changed))


def test_check_finite_names_step_and_terms(tmp_path):
  history = [(7, {"loss": 1.0, "kl": 0.5}), (8, {"loss": float("nan"), "kl": float("inf")})]
  manager = checkpoint_lib.CheckpointManager(str(tmp_path / "checkpoints"))
  with pytest.raises(errors.NonFiniteLossError, match=r"step 8 in term\(s\) \['kl', 'loss'\].* "
                     r"no checkpoint was saved before it, so there is none to resume from"):
    finite.check_finite_losses(history, "teacher", manager)
  finite.check_finite_losses(history[:1], "teacher", manager)
  assert bool(finite.all_finite({"w": jnp.ones(3), "step": jnp.int32(1)}))
  assert not bool(finite.all_finite({"w": jnp.array([1.0, jnp.inf]), "b": jnp.zeros(2)}))
  manager.close()


@pytest.mark.slow
@pytest.mark.parametrize("every_steps", [None, 1])
def test_a_divergence_names_the_last_finite_checkpoint_or_says_there_is_none(
    tmp_path, capsys, every_steps):
  """teacher.lr=1e6 from the start: the first update explodes the weights (finite, but the
  next loss is NaN); that checkpoint is never saved, whatever checkpoint.every_steps, and the
  message says there is none. With every_steps=1, the tiny run trained normally (16 steps)
  and then continued for an epoch at lr=1e6 stops naming step 16, whose weights resume at a
  normal rate without diverging again. Both diverging runs have the same schedule (one
  program). The normal run saves at its end only: the continuation's cadence is the subject."""
  workdir = str(tmp_path / "run")
  directory = os.path.join(workdir, "teacher", "checkpoints")
  extra = {"stage": "teacher", "teacher.eval_every_epochs": 100}
  args = ["--config=configs/demo.py", *tiny_overrides(str(tmp_path), **extra)]
  epoch = tiny.TEACHER_STEPS // tiny.TINY["teacher.epochs"]
  longer = ["--config.teacher.epochs=3", "--config.checkpoint.allow_config_change=True"]
  if every_steps:
    longer.append(f"--config.checkpoint.every_steps={every_steps}")
  diverging = longer + ["--config.teacher.lr=1e6"]

  def last_line():
    return capsys.readouterr().err.strip().splitlines()[-1]
  if not every_steps:
    assert cli.main_from_args(args + diverging, workdir) == 1
    message = last_line()
    assert "non-finite loss at step 2" in message and "Lower the learning rate" in message
    assert "no checkpoint was saved before it" in message
    assert checkpoint_lib.complete_steps(directory) == []
    return
  assert cli.main_from_args(args, workdir) == 0
  assert cli.main_from_args(args + diverging, workdir) == 1
  message = last_line()
  assert f"non-finite loss at step {tiny.TEACHER_STEPS + 2}" in message, message
  assert (f"the last checkpoint, step {tiny.TEACHER_STEPS} in {directory}, is finite"
          in message)
  assert max(checkpoint_lib.complete_steps(directory)) == tiny.TEACHER_STEPS
  assert cli.main_from_args(args + longer, workdir) == 0, last_line()
  final = restore_params(directory, tiny.TEACHER_STEPS + epoch)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(final))


# The demo's numbers are the README's: compiled as users compile them (tests/xla_flags.py).
USERS_COMPILER = {"XLA_FLAGS": xla_flags.without_quick_compile()}


def demo_run(tmp_path):
  """(directory it ran in, its workdir, its output, the re-evaluation's data arguments) of the
  README's first command.

  `.ci/run` runs that command as written (plain install, fresh copy) just before the test
  command and names its run in DAKD_DEMO_DIR (where it ran), DAKD_DEMO_WORKDIR (its --workdir)
  and DAKD_DEMO_LOG (its output): checked here as it is, not run a second time. Without them
  (a developer's suite) the demo config runs here, with a shorter student.
  """
  if os.environ.get("DAKD_DEMO_WORKDIR"):
    directory = os.environ["DAKD_DEMO_DIR"]
    with open(os.environ["DAKD_DEMO_LOG"]) as f:
      output = f.read()
    return directory, os.path.join(directory, os.environ["DAKD_DEMO_WORKDIR"]), output, []
  demo_sizes = ("--config.synthetic.", "--config.model.", "--config.pretrain.enabled",
                "--config.data.ids_per_batch", "--config.eval.", "--config.teacher.")
  args = [a for a in tiny_overrides(str(tmp_path), **{
      "distill.epochs": 1, "distill.steps_per_epoch": 8, "log.every_steps": 10})
          if not a.startswith(demo_sizes)]
  # A relative workdir, as in the README's command (Orbax itself needs absolute paths).
  output = finish(run_py(args, "demo", env_extra=USERS_COMPILER, cwd=str(tmp_path)))
  return str(tmp_path), str(tmp_path / "demo"), output, args


@pytest.mark.slow
def test_demo_end_to_end_teacher_learns_cross_modal_matching(tmp_path):
  """The README's first command (demo data, model, pretraining and teacher budgets; here a
  shorter student unless CI's own run of the command is checked, see demo_run): synthetic
  trees -> TFDS -> pretrain -> teacher -> student -> every protocol -> the closing table of
  every stage (stages.json; its rows are checked against independent evaluations in
  tests/test_stages.py).

  Learning, on the held-out test persons, infrared->visible all-search single-shot: the
  untrained network sits near chance (1/24 persons); the pretrain stage lifts it; the teacher
  ends clearly above the init it started from (issue 17: it once added only +1.7 R1).
  """
  directory, workdir, output, data_args = demo_run(tmp_path)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  teacher_steps = config["teacher"]["epochs"] * config["teacher"]["steps_per_epoch"]
  teacher_evals = [r for r in read_jsonl(os.path.join(workdir, "teacher", "metrics.jsonl"))
                   if "eval_rank1" in r]
  assert teacher_steps == 120
  assert [r["step"] for r in teacher_evals] == [teacher_steps]  # once, after the last epoch
  with open(os.path.join(workdir, "stages.json")) as f:
    rows = {row["name"].split(" (")[0]: row["results"]["sysu_mm01/all/single-shot"]["mean"]
            for row in json.load(f)["rows"]}
  assert list(rows) == ["untrained", "initial weights", "teacher", "student"]
  rank1 = {name: mean["cmc"][0] for name, mean in rows.items()}
  mean_ap = {name: mean["mAP"] for name, mean in rows.items()}
  print("all-search single-shot rank-1:", {k: round(100 * v, 2) for k, v in rank1.items()})
  assert rank1["untrained"] < 0.1  # near chance: 24 test persons
  assert rank1["initial weights"] > rank1["untrained"] + 0.05
  assert rank1["teacher"] > rank1["initial weights"] + 0.05
  assert mean_ap["teacher"] > mean_ap["initial weights"] + 0.03
  assert rank1["teacher"] > 3 * rank1["untrained"]
  assert rank1["teacher"] == pytest.approx(teacher_evals[-1]["eval_rank1"])
  assert "every stage on sysu_mm01/all/single-shot, 10 trials" in output
  assert "teacher - initial weights (pretrain): R1 +" in output

  # The pretrain stage wrote its weights and evaluated itself; the student was evaluated on
  # every protocol of the demo config.
  assert os.path.isfile(os.path.join(workdir, "pretrain", "backbone.npz"))
  assert "[pretrain step 300] evaluation" in output
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    report = json.load(f)
  assert "student" in report["source"]
  settings = report["results"]
  assert sorted(settings) == sorted(f"sysu_mm01/{m}/{s}-shot" for m in ("all", "indoor")
                                    for s in ("single", "multi"))
  for name, setting in settings.items():
    trials = setting["trials"]
    assert len(trials) == 10
    assert all(t["num_query"] == trials[0]["num_query"] for t in trials)
    shots = 10 if "multi" in name else 1
    assert all(t["num_gallery"] % shots == 0 for t in trials)
    assert setting["mean"]["mAP"] == pytest.approx(np.mean([t["mAP"] for t in trials]))
  student_steps = [r["step"] for r in read_jsonl(os.path.join(workdir, "student",
                                                              "metrics.jsonl")) if "loss" in r]
  assert student_steps[-1] == config["distill"]["epochs"] * config["distill"]["steps_per_epoch"]
  assert "evaluation of" in output and "sysu_mm01/indoor/multi-shot" in output
  # Expected library warnings (run.EXPECTED_WARNINGS) are filtered out of the run's output,
  # although this run triggers them (periodic saves, read-only restores).
  assert "tracked_metric" not in output and "is read only" not in output
  # Re-evaluating from the saved features reproduces the checkpoint's results exactly (here in
  # this process: scoring saved features runs no compiled network).
  again = str(tmp_path / "again")
  evaluated = run_cli(data_args + [
      "--config.stage=eval", "--config.eval.features=" + os.path.join(workdir, "eval",
                                                                      "features.npz"),
      f"--workdir={again}"], cwd=directory)  # the demo config's relative data paths
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  with open(os.path.join(again, "eval", "features-features", "results.json")) as f:
    assert json.load(f)["results"] == report["results"]


def test_student_without_teacher_fails_clearly(tmp_path):
  result = run_cli(tiny_overrides(str(tmp_path), stage="student", **{"data.num_workers": -1})
                   + [f"--workdir={tmp_path / 'run'}"])
  output = result.stdout + result.stderr
  assert result.returncode == 1
  # The loader worker count chosen for this host is printed once at start-up.
  assert len(re.findall(r"dakd_jax: data\.num_workers=auto -> \d+ \(\d+ CPUs; ", output)) == 1
  assert "no checkpoint in" in output and "train the teacher first" in output
  assert "Traceback" not in output


def test_training_time_table_fits_80_columns(tmp_path, capsys):
  """What evaluate_during_training prints between progress lines: its title, then the table
  at 80 columns; a setting name too long for its column gets a line of its own."""
  long_name, short_name = "llcm/visible_to_infrared/deen_test_script", "sysu_mm01/all/single-shot"

  class FixedEvaluator:
    settings = evaluator_lib.EvalSettings()

    def run(self, variables):
      del variables
      return {long_name: {"mean": {"cmc": [0.25] + [0.5] * 19, "mAP": 0.4, "mINP": 0.3},
                          "trials": [{}] * 10},
              short_name: {"mean": {"cmc": [0.125] * 4 + [0.9] * 16, "mAP": 0.3141,
                                    "mINP": 0.2}, "trials": [{}, {}]}}

  writer = writers.MetricWriter(str(tmp_path), stage="teacher", enabled=False)
  summary = loop.evaluate_during_training(FixedEvaluator(), None, writer, 30, "test_oracle")
  assert summary == {"rank1": 0.25, "mAP": 0.4, "mINP": 0.3}  # the first setting ranks
  lines = capsys.readouterr().out.splitlines()
  # The title says what the evaluation is for (here the reference's oracle selection).
  assert lines[:2] == ["", "[teacher step 30] evaluation (test split, oracle selection of the "
                       "checkpoint)"]
  assert all(len(line) <= 80 for line in lines)
  assert lines[lines.index(long_name) + 1].split() == [
      "25.00", "50.00", "50.00", "50.00", "40.00", "30.00", "10"]
  row = next(line for line in lines if line.startswith(short_name))
  assert row.split() == [short_name, "12.50", "90.00", "90.00", "90.00", "31.41", "20.00", "2"]
