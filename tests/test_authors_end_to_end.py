"""The authors' trained models through the command line, as a user with their files would run
them (`run.py` for the student; the evaluation and the refusal through `cli.main_from_args`, what
run.py calls, in the test's process).

A torch network with the authors' parameter names and a real ResNet-50 of width 64
(tests/torch_resnet.py) is saved as their teacher `.t` file. `stage=eval` evaluates it with our
protocol on a small synthetic SYSU-MM01 tree and prints the numbers the file records beside
ours; the embeddings it saves equal the torch network's. `stage=student` distils a JAX student
from it. The authors' student file is refused as a teacher, in one line.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dakd_jax import augment
from dakd_jax import cli
from dakd_jax.data.records import load_image
from tests.torch_resnet import make_authors_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 96, 48
RECORDED = {"epoch": 79, "mAP": np.float64(0.6731), "mINP": np.float64(0.5012),
            "cmc": np.linspace(0.7, 0.99, 20).astype(np.float32)}


def run_arguments(*overrides, tmp):
  """--config arguments of these runs: the released preset at the authors' network size."""
  args = {"data.root": os.path.join(tmp, "synthetic"), "data.prepared_dir": os.path.join(tmp, "tfds"),
          "synthetic.num_train_ids": 6, "synthetic.num_val_ids": 1, "synthetic.num_test_ids": 4,
          "synthetic.images_per_camera": 2, "model.depth": 50, "model.width": 64,
          "pretrain.enabled": False, "data.ids_per_batch": 2, "data.images_per_id": 2,
          "eval.batch_size": 16, "eval.num_trials": 2, "eval.modes": "all",
          "eval.shots": "single", "eval.max_rank": 4, "eval.pictures": False,
          "log.progress": False, "distill.epochs": 1, "distill.steps_per_epoch": 1,
          # The real configs' default (the demo keeps xla): this ResNet-50's student step also
          # compiles faster with it (64 s against 75 s for the test here).
          "model.conv_backward": "auto"}
  return [f"--config={os.path.join(REPO, 'configs', 'demo.py')}:released_code",
          *[f"--config.{k}={v}" for k, v in args.items()], *overrides]


def run_py(workdir, *overrides, tmp):
  """run.py in a subprocess, as a user runs it."""
  command = [sys.executable, "run.py", f"--workdir={workdir}",
             *run_arguments(*overrides, tmp=tmp)]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def authors_files(tmp_path_factory):
  directory = tmp_path_factory.mktemp("authors")
  net = make_authors_network(64, seed=3, memory_classes=7, image_size=(HEIGHT, WIDTH))
  state = net.state_dict()
  teacher = str(directory / "sysu_teacher_best.t")
  torch.save({"net": state, **RECORDED}, teacher)
  student = str(directory / "sysu_student_best.pth")
  torch.save({"net": {k: v for k, v in state.items() if not k.startswith("memory")},
              "epoch": 3, "mAP": np.float64(0.5), "ablation": {"full": True}, "config": {}},
             student)
  return {"net": net, "teacher": teacher, "student": student, "tmp": str(directory)}


@pytest.mark.slow
def test_eval_of_the_authors_teacher_reproduces_the_torch_embeddings(authors_files, capsys):
  tmp = authors_files["tmp"]
  workdir = os.path.join(tmp, "eval_run")
  # In this process (`cli.main_from_args`, what run.py calls); the student below runs run.py.
  code = cli.main_from_args(run_arguments(
      "--config.stage=eval", f"--config.eval.checkpoint={authors_files['teacher']}", tmp=tmp),
                            workdir)
  printed = capsys.readouterr()
  assert code == 0, printed.out[-3000:] + printed.err[-3000:]
  # The file's own record is printed beside ours (their evaluation at their epoch).
  assert "recorded in the file (the authors' evaluation, epoch 79)" in printed.out
  assert "R1    file   70.00" in printed.out and "mAP   file   67.31" in printed.out
  # Another checkpoint than the workdir's student: evaluated into eval/<its file name>.
  summary = json.load(open(os.path.join(workdir, "eval", "sysu_teacher_best", "results.json")))
  assert summary["source"] == authors_files["teacher"]
  assert summary["recorded_by_file"]["epoch"] == 79
  # Our embeddings of the prepared test images equal the torch network's.
  stored = np.load(os.path.join(workdir, "eval", "sysu_teacher_best", "features.npz"))
  root = os.path.join(tmp, "synthetic")
  chosen = np.arange(0, len(stored["paths"]), 7)
  images = np.stack([load_image(os.path.join(root, str(path)), HEIGHT, WIDTH)
                     for path in stored["paths"][chosen]])
  normalised = np.array(augment.normalize(images))  # writable, for torch.from_numpy
  with torch.no_grad():
    expected = authors_files["net"](torch.from_numpy(normalised.transpose(0, 3, 1, 2))).numpy()
  error = np.abs(stored["embeddings"][chosen] - expected).max() / np.abs(expected).max()
  assert error < 1e-4, error


@pytest.mark.slow
def test_student_distils_from_the_authors_teacher_and_refuses_their_student(authors_files,
                                                                            capsys):
  tmp = authors_files["tmp"]
  workdir = os.path.join(tmp, "student_run")
  # One student call on both modalities (grouped BNs; equal to the two calls, tests/test_steps.py):
  # this ResNet-50's student step then compiles one network pass, not two.
  result = run_py(workdir, "--config.stage=student", "--config.distill.student_forward=grouped",
                  f"--config.distill.teacher_checkpoint={authors_files['teacher']}", tmp=tmp)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert f"teacher from {authors_files['teacher']}" in result.stdout
  records = [json.loads(line) for line in open(os.path.join(workdir, "student",
                                                             "metrics.jsonl"))]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] > 0
  # Refused before any work: in this process (`cli.main_from_args`, what run.py calls).
  code = cli.main_from_args(run_arguments(
      "--config.stage=student",
      f"--config.distill.teacher_checkpoint={authors_files['student']}", tmp=tmp),
                            os.path.join(tmp, "refused"))
  stderr = capsys.readouterr().err
  assert code == 1 and "Traceback" not in stderr
  assert stderr.strip().splitlines()[-1].startswith(
      f"dakd_jax: error: {authors_files['student']} holds the authors' DAKD student, not a "
      "trained teacher")
