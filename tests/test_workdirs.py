"""Workdirs that are safe to share and move (issue 24): one writer per workdir, a writable
workdir checked before any work, a copied workdir that resumes, evaluates and exports."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import cli
from dakd_jax import workdir_lock
from dakd_jax.evaluation import evaluations
from tests import tiny
from tests.test_cli import data_dir  # noqa: F401  pylint: disable=unused-import  (a fixture)
from tests.test_cli import one_error_line, read_only_folder, run_cli, run_py, tiny_args

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
    result = run_cli([f"--workdir={workdir}", "--config.stage=eval"])
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


def _tiny(base, *extra):
  """--config.* arguments of a tiny run with a tiny pretrain stage, data under `base`."""
  return tiny_args(base, **tiny.PRETRAIN, **{"pretrain.data_root": f"{base}/pretrain_data",
                                            "eval.pictures": False}) + list(extra)


def _main(args, workdir):
  return cli.main_from_args(["--config=configs/demo.py", *args], workdir)


@pytest.mark.slow
def test_a_copied_workdir_resumes_evaluates_and_finds_its_results(tmp_path, data_dir, capsys):
  """Pretrain + teacher in W; `cp -a W W2`: the same command in W2 resumes (the pretrain
  weights file is named by its place in the workdir), W2 evaluates its teacher, and once W2 is
  moved the export's manifest still finds that evaluation."""
  from dakd_jax import stages  # pylint: disable=import-outside-toplevel
  original, copy = str(tmp_path / "W"), str(tmp_path / "W2")
  for stage in ("pretrain", "teacher"):
    assert _main(_tiny(data_dir, f"--config.stage={stage}"), original) == 0
  subprocess.run(["cp", "-a", original, copy], check=True)
  capsys.readouterr()
  assert _main(_tiny(data_dir, "--config.stage=teacher"), copy) == 0
  assert "config differs" not in capsys.readouterr().err
  assert _main(_tiny(data_dir, "--config.stage=eval",
                     f"--config.eval.checkpoint={copy}/teacher"), copy) == 0
  stored = json.load(open(os.path.join(copy, "eval", "teacher", "results.json")))
  last = f"step {tiny.TEACHER_STEPS}"
  assert stored["source"].startswith(f"{copy}/teacher/checkpoints {last}")
  moved = str(tmp_path / "W3")
  os.rename(copy, moved)
  source = stored["source"].replace(copy, moved)
  recorded = stages.recorded_results(moved, source)
  assert recorded["results"] == {name: value["mean"] for name, value in stored["results"].items()}
  assert stages.recorded_results(moved, source.replace(last, "step 1")) is None
  # The moved teacher opens quietly in Python (no Orbax warnings) and embeds grey arrays.
  import logging  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dakd_jax.evaluation import extractor  # pylint: disable=import-outside-toplevel
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logging.getLogger().addHandler(handler)
  try:
    model = extractor.Extractor.from_checkpoint(os.path.join(moved, "teacher"))
  finally:
    logging.getLogger().removeHandler(handler)
  assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
  grey = np.random.default_rng(0).integers(0, 256, model.image_size, dtype=np.uint8)
  np.testing.assert_allclose(model(grey, "infrared"),
                             model(np.stack([grey] * 3, -1)[None], "infrared"), atol=1e-6)


def test_the_pretrain_weights_compare_by_their_place_in_the_workdir():
  def config(workdir, enabled=True):
    return {"pretrain": {"enabled": enabled},
            "model": {"init_weights": f"{workdir}/pretrain/backbone.npz"}}
  assert checkpoint_lib.diff_configs(config("/a/W"), config("/b/W2")) == []
  # Without the pretrain stage the file is the user's own: a changed path is a change.
  assert checkpoint_lib.diff_configs(config("/a/W", False), config("/b/W2", False)) == [
      "model.init_weights: '/a/W/pretrain/backbone.npz' -> '/b/W2/pretrain/backbone.npz'"]
  assert len(checkpoint_lib.diff_configs(config("/a/W"), {
      "pretrain": {"enabled": True}, "model": {"init_weights": "/a/W/other.npz"}})) == 1


def test_each_evaluation_is_named_by_its_checkpoint_and_settings():
  from dakd_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  def tag(*overrides):
    config = config_lib.load_config("configs/demo.py", list(overrides), validate_config=False)
    return evaluations.evaluation_tag(config, "/w")
  assert tag() == "" and tag("eval.checkpoint=/w/student") == tag("eval.checkpoint=/w/student/")
  assert tag("eval.checkpoint=/w/student") == ""
  assert tag("eval.rerank=True") == "rerank"
  assert tag("eval.checkpoint=/w/teacher", "eval.rerank=True") == "teacher-rerank"
  assert tag("eval.checkpoint=/w/teacher/checkpoints", "eval.flip=True",
             "eval.query_expansion=True") == "teacher-checkpoints-flip-aqe"
  assert tag("eval.checkpoint=/elsewhere/sysu teacher_best.t") == "sysu-teacher_best"
  assert tag("eval.features=/w/eval/features.npz") == "features-features"
  assert evaluations.evaluation_dir("/w", "") == "/w/eval"
  assert evaluations.report_path("/w", "") == "/w/report.md"
  assert evaluations.report_path("/w", "rerank") == "/w/eval/rerank/report.md"


@pytest.mark.slow
def test_a_second_evaluation_with_other_settings_keeps_the_first(tmp_path, data_dir, capsys):
  from dakd_jax import builders  # pylint: disable=import-outside-toplevel
  from dakd_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from dakd_jax.models import weights  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config("configs/demo.py",
                                  [a[len("--config."):] for a in tiny_args(data_dir)],
                                  validate_config=False)
  weights_file = str(tmp_path / "random.npz")
  weights.save_variables(builders.init_model_variables(
      config, builders.model_from_config(config), jax.random.key(0)), weights_file)
  workdir = str(tmp_path / "run")
  plain = tiny_args(data_dir, stage="eval", **{"eval.checkpoint": weights_file,
                                               "eval.num_visual_queries": 2})
  assert _main(plain, workdir) == 0
  first = open(os.path.join(workdir, "eval", "random", "results.json")).read()
  assert _main(plain + ["--config.eval.rerank=True"], workdir) == 0
  assert open(os.path.join(workdir, "eval", "random", "results.json")).read() == first
  plain_results = json.loads(first)
  reranked = json.load(open(os.path.join(workdir, "eval", "random-rerank", "results.json")))
  assert plain_results["protocol"]["rerank"] is False and reranked["protocol"]["rerank"] is True
  assert plain_results["results"] != reranked["results"]
  for folder in ("random", "random-rerank"):
    assert os.path.getsize(os.path.join(workdir, "eval", folder, "cmc.png")) > 1000
  index = json.load(open(os.path.join(workdir, "eval", "index.json")))
  assert sorted(index) == ["random", "random-rerank"]
  assert index["random-rerank"]["headline"]["mAP"] == reranked["results"][
      "sysu_mm01/all/single-shot"]["mean"]["mAP"]
  report = open(os.path.join(workdir, "eval", "random-rerank", "report.md")).read()
  assert "](../../eval/random/report.md)" in report and "(cmc.png)" in report
  assert "2 evaluations in this workdir" in capsys.readouterr().out


def test_the_extractor_takes_grey_and_single_images():
  import types  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dakd_jax.evaluation import extractor  # pylint: disable=import-outside-toplevel
  holder = types.SimpleNamespace(image_size=(8, 4))
  load = lambda images: extractor.Extractor.load_images(holder, images)  # noqa: E731
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (8, 4), dtype=np.uint8)
  colour = rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)
  np.testing.assert_array_equal(load(grey), np.stack([grey, grey, grey], -1)[None])
  np.testing.assert_array_equal(load(colour), colour[None])
  np.testing.assert_array_equal(load(np.stack([grey, grey])),
                                np.stack([np.stack([grey] * 3, -1)] * 2))
  np.testing.assert_array_equal(load([grey[..., None], colour])[1], colour)
  with pytest.raises(ValueError, match=r"image 0: expected uint8 .* got float32 \(8, 4\)"):
    load([grey.astype(np.float32)])


def test_help_needs_no_config_and_exits_0():
  result = subprocess.run([sys.executable, "run.py", "--help"], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert "usage: python run.py --config=configs/<name>.py" in result.stdout
  assert "configs/demo.py" in result.stdout and "--workdir" in result.stdout
  with_config = subprocess.run([sys.executable, "run.py", "--config=configs/demo.py", "-h"],
                               capture_output=True, text=True, timeout=120)
  assert with_config.returncode == 0 and with_config.stdout == result.stdout


def test_an_evaluation_panel_spans_the_run_and_the_percent_range(tmp_path):
  from dakd_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  records = [{"step": 10, "loss": 2.0}, {"step": 120, "loss": 1.0, "eval_rank1": 0.31,
                                         "eval_mAP": 0.35}]
  assert plots.evaluation_axis_limits(records) == ((0.0, 126.0), (0.0, 100.0))
  assert plots.evaluation_axis_limits([{"step": 0}]) == ((0.0, 1.05), (0.0, 100.0))
  path = plots.training_curves_plot({"teacher": records}, str(tmp_path / "curves.png"))
  assert os.path.getsize(path) > 1000


def test_the_pretrain_evaluation_says_whose_persons_it_ranks():
  from dakd_jax.train import loop  # pylint: disable=import-outside-toplevel
  assert "pretraining set's own held-out persons" in loop.evaluation_role("pretrain", "last")
  assert "not the experiment's test split" in loop.evaluation_role("pretrain", "val")
  assert loop.evaluation_role("teacher", "last") == loop.EVALUATION_ROLES["last"]
  assert loop.evaluation_role("student", "val") == loop.EVALUATION_ROLES["val"]
