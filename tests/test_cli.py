"""User mistakes, as a user makes them: each ends in one line and loses nothing.

Every test checks what the user sees: a non-zero exit (2 for a config mistake, 1 otherwise),
exactly one `dakd_jax: ... error:` line on stderr naming the file or field and the fix, no
traceback, and nothing of an earlier run overwritten. Mistakes refused before any work run
in-process through `cli.main_from_args` (what run.py calls after its flags; `run_cli`); what
needs a process of its own runs `run.py` in a subprocess (`run_py`): flag parsing, and the
storage failures below.

Storage failures are real ones: folders made read-only with chmod, with run.py started through
`tests/restricted.py permissions` so that it obeys them even as root; a full disk is a file size
limit (`tests/restricted.py small_disk`), past which the kernel refuses writes as a full disk
would.
"""
import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from dakd_jax import builders
from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import cli
from dakd_jax import config as config_lib
from dakd_jax import errors
from dakd_jax.data import synthetic
from dakd_jax.models import weights
from tests import tiny
from tests.file_trees import tree_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
RESTRICTED = os.path.join(REPO, "tests", "restricted.py")


def tiny_args(data_dir, **extra):
  """--config.* arguments of the shared tiny run (tests/tiny.py) whose data lives under
  `data_dir`."""
  return tiny.arguments({**tiny.TINY, "data.root": os.path.join(data_dir, "synthetic"),
                         "data.prepared_dir": os.path.join(data_dir, "tfds"), **extra})


def run_py(args, *, config=DEMO, restriction=None, timeout=600):
  """run.py in a subprocess (stdout and stderr apart), under a tests/restricted.py restriction
  when one is named."""
  command = [sys.executable, os.path.join(REPO, "run.py")]
  command += [f"--config={config}"] if config else []
  if restriction:
    command = [sys.executable, RESTRICTED, restriction] + command
  return subprocess.run(command + list(args), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def run_cli(args, *, config=DEMO, cwd=REPO):
  """The same arguments through `cli.main_from_args` in this process (what run.py does after
  parsing its own flags), relative paths resolved from `cwd`: returns what run_py returns,
  stdout and stderr apart."""
  config_args, rest = config_lib.split_argv(([f"--config={config}"] if config else []) + args)
  workdirs = [arg.split("=", 1)[1] for arg in rest if arg.startswith("--workdir=")]
  print_only = "--print_config" in rest
  assert len(workdirs) + print_only == len(rest), (
      f"run_cli takes --config*, --workdir and --print_config only: {rest}")
  stdout, stderr = io.StringIO(), io.StringIO()
  here = os.getcwd()
  os.chdir(cwd)  # Relative paths resolve as in run_py, which runs in the repository.
  try:
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      code = cli.main_from_args(config_args, workdirs[0] if workdirs else None,
                                print_only=print_only)
  finally:
    os.chdir(here)
  return types.SimpleNamespace(returncode=code, stdout=stdout.getvalue(),
                               stderr=stderr.getvalue())


def one_error_line(result, *needles, code=1):
  """The run's one error message; checks the exit code, that nothing else is an error, that
  no traceback was printed and that the message is the last thing said."""
  output = result.stdout + result.stderr
  assert result.returncode == code, output[-3000:]
  assert "Traceback" not in output and "Event loop is closed" not in output, output[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("dakd_jax: ") and ("error: " in line or "invalid config: " in line)]
  assert len(errors) == 1, result.stderr[-3000:]
  assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def read_only_folder(path):
  """Creates `path` as a read-only folder and proves that a restricted child cannot write in it."""
  os.makedirs(path, exist_ok=True)
  os.chmod(path, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH
           | stat.S_IXOTH)
  probe = subprocess.run(
      [sys.executable, RESTRICTED, "permissions", sys.executable, "-c",
       f"open({os.path.join(path, 'probe')!r}, 'w')"], capture_output=True, text=True)
  assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
  return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A tiny synthetic tree, generated and prepared once for the module's runs."""
  base = str(tmp_path_factory.mktemp("cli_data"))
  overrides = [arg[len("--config."):] for arg in tiny_args(base)]
  builders.prepare_data(config_lib.load_config(DEMO, overrides, validate_config=False))
  return base


@pytest.mark.parametrize("config, args, code, needles", [
    ("configs/missing.py", [], 2, ["config file not found: configs/missing.py",
                                   "configs/demo.py"]),
    ("configs/demo.py:nonsense", [], 2, ["unknown preset 'nonsense'", "choose one of"]),
    ("configs/demo.py", ["--config.techer.epochs=1"], 2,
     ["'techer'", "did you mean 'teacher'"]),
    ("configs/demo.py", ["--config.seed=-1"], 2, ["config.seed = -1", "--config.seed="]),
    ("configs/demo.py", ["--config.stage=teacher", "--config.teacher.epochs=0"], 2,
     ["config.teacher.epochs = 0", "--config.teacher.epochs=1"]),
    ("configs/demo.py", ["--config.eval.modes=all,indoor"], 2,
     ["config.eval.modes = ('all,indoor',)", "--config.eval.modes=\"('all','indoor',)\""]),
    ("configs/demo.py", ["--config.teacher.lr=fast"], 2, ["--config.teacher.lr=fast"]),
])
def test_config_mistakes_end_in_one_line_before_anything_is_written(tmp_path, config, args, code,
                                                                    needles):
  workdir = str(tmp_path / "run")
  result = run_cli(args + [f"--workdir={workdir}"], config=config)
  one_error_line(result, *needles, code=code)
  assert not os.path.exists(workdir)


def test_misspelt_flag_names_the_flag_and_the_usage(tmp_path):
  result = run_py([f"--wokdir={tmp_path / 'run'}"])
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.splitlines() == [
      "dakd_jax: Unknown command line flag 'wokdir'. Did you mean: workdir ?",
      "usage: python run.py --config=configs/<name>.py[:arg] [--config.<field>=<value> ...] "
      "[--workdir=DIR] [--print_config]"]


def test_workdir_or_prepared_dir_that_is_a_file_is_refused_untouched(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  result = run_cli(tiny_args(str(tmp_path)) + [f"--workdir={a_file}"])
  one_error_line(result, f"--workdir={a_file}", "is a file, not a folder", code=2)
  result = run_cli(tiny_args(str(tmp_path), **{"data.prepared_dir": str(a_file / "tfds")})
                  + [f"--workdir={tmp_path / 'run'}"])
  one_error_line(result, "--config.data.prepared_dir=", f"{a_file} is a file", code=2)
  assert a_file.read_text() == "mine" and not (tmp_path / "run").exists()


def test_max_rank_longer_than_a_gallery_is_refused_before_any_training(tmp_path, data_dir):
  """stage=all with pretraining: the check runs before the pretrain stage, which would train
  first (its own data is never generated)."""
  workdir = tmp_path / "run"
  pretrain_root = tmp_path / "pretrain_data"
  result = run_cli(tiny_args(data_dir, **{
      "eval.max_rank": 50, "pretrain.enabled": True, "pretrain.data_root": str(pretrain_root),
      "pretrain.num_ids": 4, "pretrain.num_test_ids": 2, "pretrain.images_per_camera": 2}) +
      [f"--workdir={workdir}"])
  # The tiny test split has 6 persons: galleries fill at most 6 ranks.
  one_error_line(result, "config.eval.max_rank = 50", "--config.eval.max_rank=6", code=2)
  assert not pretrain_root.exists() and not (workdir / "pretrain").exists()
  assert not (workdir / "teacher").exists()


def stage_checkpoint(directory, config, stage, step=4):
  """A checkpoint as a stage writes it: a state and metadata naming the stage and config."""
  manager = checkpoint_lib.CheckpointManager(str(directory), use_async=False)
  manager.save(step, {"params": {"w": np.zeros(3, np.float32)}},
               {"config": config.to_dict(), "stage": stage, "epoch": 1})
  manager.close()


def test_resume_with_a_changed_config_is_refused_first_and_leaves_config_json(tmp_path):
  args = tiny_args(str(tmp_path), stage="teacher")
  config = config_lib.load_config(DEMO, [a[len("--config."):] for a in args],
                                  validate_config=False)
  workdir = tmp_path / "run"
  checkpoints = workdir / "teacher" / "checkpoints"
  stage_checkpoint(checkpoints, config, "teacher")
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  before = tree_bytes(str(workdir))
  result = run_cli(args + ["--config.teacher.lr=0.01", f"--workdir={workdir}"])
  message = one_error_line(result, f"checkpoint {checkpoints}/4", "teacher.lr: 0.00035 -> 0.01",
                           "--config.checkpoint.allow_config_change=True")
  assert result.stderr.splitlines() == [message] and result.stdout == ""
  assert tree_bytes(str(workdir)) == before  # config.json and the checkpoint as they were
  assert checkpoint_lib.complete_steps(str(checkpoints)) == [4]


@pytest.mark.parametrize("verbose", [False, True])
def test_ctrl_c_ends_in_one_line_saying_how_to_resume(tmp_path, monkeypatch, capsys, verbose):
  def interrupted(config, workdir):
    raise KeyboardInterrupt

  monkeypatch.setattr(cli, "start", interrupted)
  code = cli.main_from_args([f"--config={DEMO}"], str(tmp_path / "run"), verbose=verbose)
  lines = capsys.readouterr().err.splitlines()
  assert code == 130
  assert lines[-1] == ("dakd_jax: interrupted: each stage keeps its last saved checkpoint; "
                       "run the same command again to resume from it")
  assert (lines[0] == "Traceback (most recent call last):") == verbose == (len(lines) > 1)


def test_rerun_with_pretraining_resumes_from_checkpoints_of_the_derived_config(tmp_path):
  """With pretraining, the teacher stores the config it ran with: model.init_weights names the
  pretrain stage's file. The same command again (after a crash, or to re-evaluate) is not a
  changed config; a real change still is."""
  args = tiny_args(str(tmp_path), stage="all", **{"pretrain.enabled": True})
  config = config_lib.load_config(DEMO, [a[len("--config."):] for a in args],
                                  validate_config=False)
  workdir = tmp_path / "run"
  ran_with = config.copy_and_resolve_references()
  ran_with.model.init_weights = str(workdir / "pretrain" / "backbone.npz")
  stage_checkpoint(workdir / "teacher" / "checkpoints", ran_with, "teacher")
  cli.check_resumable(config, str(workdir))  # the README command run twice: accepted
  config.teacher.lr = 0.01
  with pytest.raises(errors.UserError, match="teacher.lr: 0.00035 -> 0.01"):
    cli.check_resumable(config, str(workdir))


@pytest.mark.parametrize("stage", ["pretrain", "student"])
def test_a_non_teacher_checkpoint_as_teacher_is_refused_before_data(tmp_path, stage):
  args = tiny_args(str(tmp_path), stage="student")
  config = config_lib.load_config(DEMO, [a[len("--config."):] for a in args],
                                  validate_config=False)
  other = tmp_path / "other_run" / stage
  stage_checkpoint(other / "checkpoints", config, stage)
  workdir = tmp_path / "run"
  result = run_cli(args + [f"--config.distill.teacher_checkpoint={other}",
                          f"--workdir={workdir}"])
  one_error_line(result, f"config.distill.teacher_checkpoint = '{other}'",
                 f"holds a {stage} checkpoint", "teacher workdir")
  assert not workdir.exists() and not (tmp_path / "synthetic").exists()


def bad_weights_file(folder, kind):
  """A weights file of `kind` that cannot be imported, and what its refusal must say."""
  state = {"conv1.weight": np.ones((4, 3, 7, 7), np.float32)}
  if kind == "truncated.safetensors":
    from safetensors.numpy import save_file
    path = os.path.join(folder, "whole.safetensors")
    save_file(state, path)
    with open(path, "rb") as f:
      data = f.read()
    path = os.path.join(folder, kind)
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
    return path, ["not a readable .safetensors file", "copy or convert it again"]
  path = os.path.join(folder, kind)
  if kind == "garbage.npz":
    with open(path, "wb") as f:
      f.write(bytes(range(256)) * 8)
    return path, ["is not a valid .npz file", "numpy.savez"]
  import torch  # Test-only dependency: writes a .pth that holds a module object.
  torch.save({"conv1.weight": torch.zeros(1), "optimizer": torch.nn.Linear(1, 1)}, path)
  return path, ["holds objects other than tensors", "torch.nn.modules.linear.Linear",
                "model.state_dict()", "python -m dakd_jax.models.weights convert"]


@pytest.mark.parametrize("kind", ["truncated.safetensors", "garbage.npz", "objects.pth"])
def test_unreadable_init_weights_are_refused_before_data(tmp_path, kind):
  path, needles = bad_weights_file(str(tmp_path), kind)
  with open(path, "rb") as f:
    content = f.read()
  workdir = tmp_path / "run"
  result = run_cli(tiny_args(str(tmp_path), stage="teacher",
                            **{"model.init_weights": path}) + [f"--workdir={workdir}"])
  one_error_line(result, repr(path), *needles)
  assert "pickled data" not in result.stderr and "weights_only" not in result.stderr
  assert not workdir.exists()
  with open(path, "rb") as f:
    assert f.read() == content


@pytest.mark.parametrize("synthetic_enabled, needles", [
    (True, ["config.data.root", "no synthetic_dataset.json", "--config.synthetic.enabled=False"]),
    (False, ["SYSU-MM01 camera folder missing", "re-extract the dataset"]),
])
def test_a_data_root_that_is_not_a_dataset_is_refused_untouched(tmp_path, synthetic_enabled,
                                                               needles):
  photos = tmp_path / "photos"
  photos.mkdir()
  (photos / "holiday.txt").write_text("not a dataset")
  result = run_cli(tiny_args(str(tmp_path), **{"data.root": str(photos),
                                             "synthetic.enabled": synthetic_enabled})
                  + [f"--workdir={tmp_path / 'run'}"])
  one_error_line(result, str(photos), *needles)
  assert tree_bytes(str(photos)) == {"holiday.txt": b"not a dataset"}
  assert sorted(os.listdir(tmp_path)) == ["photos", "run"]  # no partial tree beside it


def test_a_missing_regdb_trial_file_is_named(tmp_path):
  root = str(tmp_path / "RegDB")
  synthetic.ensure_synthetic(root, "regdb", num_ids=6, images_per_modality=2, height=32,
                             width=16, num_trials=3)
  os.remove(os.path.join(root, "idx", "train_visible_3.txt"))
  result = run_cli([f"--config.data.root={root}", f"--config.data.prepared_dir={tmp_path}/tfds",
                   f"--workdir={tmp_path / 'run'}"], config="configs/regdb.py:trial=3")
  one_error_line(result, os.path.join(root, "idx", "train_visible_3.txt"))


def test_an_extract_folder_without_images_is_refused_before_the_checkpoint(tmp_path):
  empty = tmp_path / "my_images"
  empty.mkdir()
  (empty / ".hidden").write_text("")
  workdir = tmp_path / "run"
  result = run_cli(tiny_args(str(tmp_path), stage="extract",
                            **{"extract.query_dir": str(empty)}) + [f"--workdir={workdir}"])
  one_error_line(result, f"image folder {empty} holds no files", "config.extract.query_dir")
  assert not (workdir / "extract").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["workdir", "checkpoints", "metrics", "prepared", "root"])
def test_read_only_folders_end_in_one_storage_line(tmp_path, data_dir, name):
  """The workdir, the checkpoint folder, the stage folder (metrics), the prepared data and the
  dataset root, each read-only in turn: one line naming what could not be written."""
  train = tiny_args(data_dir, stage="teacher")
  args, read_only, expected = {
      "workdir": (train, "run", "cannot write the workdir ({w})"),
      "checkpoints": (train, "run/teacher/checkpoints",
                      "cannot write the checkpoint in {w}/teacher/checkpoints"),
      "metrics": (train, "run/teacher", "cannot write the metrics in {w}/teacher"),
      "prepared": (tiny_args(data_dir, stage="teacher", **{
          "data.prepared_dir": str(tmp_path / "tfds")}), "tfds",
                   "cannot write the prepared SYSU-MM01 data in " + str(tmp_path / "tfds")),
      "root": (tiny_args(data_dir, stage="teacher", **{
          "data.root": str(tmp_path / "data" / "synthetic")}), "data",
               "cannot write the synthetic dataset in " + str(tmp_path / "data")),
  }[name]
  base = tmp_path / name
  workdir = base / "run"
  if name == "metrics":  # The checkpoint folder stays writable; its parent is not.
    os.makedirs(workdir / "teacher" / "checkpoints")
  read_only_folder(str(base / read_only) if name not in ("prepared", "root")
                   else str(tmp_path / read_only))
  result = run_py(args + [f"--workdir={workdir}"], restriction="permissions")
  message = one_error_line(result, expected.format(w=workdir), "Permission denied",
                           "fix the folder's permissions")
  assert not any("orbax" in line.lower() for line in result.stderr.splitlines()), name
  assert ("--config.data.prepared_dir" in message) == (name == "prepared")
  assert ("--config.data.root" in message) == (name == "root")
  assert checkpoint_lib.complete_steps(str(workdir / "teacher" / "checkpoints")) == []


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_ends_in_one_line(tmp_path, data_dir):
  """The training steps run, the checkpoint's array files pass the size limit and fail in
  Orbax's background writes: one line naming the checkpoint folder, and the run's progress
  lines fit 80 columns."""
  workdir = tmp_path / "run"
  result = run_py(tiny_args(data_dir, stage="teacher") + [f"--workdir={workdir}"],
                  restriction="small_disk")
  one_error_line(result, f"cannot write the checkpoint in {workdir}/teacher/checkpoints",
                 "File too large", "Free disk space")
  progress = [line for line in result.stderr.splitlines() if line.startswith("teacher step")]
  assert [line.split(" | ")[0] for line in progress] == [  # the first step and the last
      f"teacher step {step}/{tiny.TEACHER_STEPS}" for step in (1, tiny.TEACHER_STEPS)]
  assert all(len(line) <= 79 and line.split(" | ")[1].startswith("loss ") for line in progress)
  assert checkpoint_lib.complete_steps(str(workdir / "teacher" / "checkpoints")) == []


UNAWAITED = """
import gc, sys
sys.path.insert(0, {repo!r})
import run
if sys.argv[1] == "quiet":
  run.hide_library_noise()
async def write_fragment():  # the name Orbax's per-fragment write coroutine has
  pass
async def our_own_coroutine():
  pass
write_fragment()
our_own_coroutine()
gc.collect()
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_orbax_writes_left_unstarted_by_a_failed_save_print_no_warning(mode):
  """The full-disk run above sometimes ended with "coroutine ... write_fragment was never
  awaited" after its error line (Orbax's writes that never started, collected at exit): hidden
  without --verbosity; any other unawaited coroutine is still reported."""
  result = subprocess.run([sys.executable, "-c", UNAWAITED.format(repo=REPO), mode],
                          capture_output=True, text=True, check=True, timeout=120)
  assert "our_own_coroutine' was never awaited" in result.stderr
  assert ("write_fragment' was never awaited" in result.stderr) == (mode == "verbose")


@pytest.mark.slow
def test_a_read_only_eval_folder_ends_in_one_line_before_any_work(tmp_path, data_dir):
  config = config_lib.load_config(DEMO, [a[len("--config."):] for a in tiny_args(data_dir)],
                                  validate_config=False)
  model = builders.model_from_config(config)
  weights_file = str(tmp_path / "random.npz")
  weights.save_variables(builders.init_model_variables(config, model, jax.random.key(0)),
                         weights_file)
  workdir = tmp_path / "run"
  read_only_folder(str(workdir / "eval"))
  result = run_py(tiny_args(data_dir, stage="eval", **{"eval.checkpoint": weights_file})
                  + [f"--workdir={workdir}"], restriction="permissions")
  # Another checkpoint than the workdir's student: its evaluation goes to eval/<file name>.
  one_error_line(result, f"cannot write the evaluation folder ({workdir}/eval/random)",
                 "Permission denied")
  assert "sysu_mm01/all/single-shot" not in result.stdout  # refused before evaluating
  assert os.listdir(workdir / "eval") == []
