"""The tiny run that the end-to-end tests share: one network, one set of shapes, one schedule.

A compiled program's constants include its learning-rate schedule (epochs, steps per epoch,
warm-up, decays, rate), its shapes (image size, batch, training identities: the memories), the
network (depth, width, non-local blocks) and the loss settings. Tests that keep all of these as
given here train and evaluate the same programs, so the suite compiles each once: the
persistent compilation cache (conftest.py) serves every later test and `run.py` subprocess.
What does not enter a program is free to differ per test: test and validation identities,
trials, ranks, pictures, evaluation and checkpoint cadences, loader workers, the number of
epochs (the schedule holds steps per epoch) and of student steps.
Besides the tests that import this module, the notebook's QUICK settings
(notebooks/dakd_demo.ipynb, checked by tests/test_notebook.py) keep these values. A dataset's
augmentation recipe and config enter its programs too: the RegDB and LLCM runs compile their
own.
"""
import os

TEACHER_STEPS = 16
STUDENT_STEPS = 16
TINY = {
    "synthetic.num_train_ids": 8, "synthetic.num_val_ids": 2, "synthetic.num_test_ids": 6,
    # 4 images per camera folder (the demo's 10 serve multi-shot, which the tiny run skips): a
    # third of the images to generate, prepare, embed and score (1.7 -> 0.6 s per tree).
    "synthetic.images_per_camera": 4,
    # ResNet-10 (the demo's ResNet-18 with one block per stage) at width 4 without non-local
    # blocks: the mechanics, with half the blocks to trace and compile (ResNet-18, its second
    # blocks and non-local blocks run in the demo test and tests/test_resnet.py).
    "model.depth": 10, "model.width": 4, "model.non_local": False,
    "data.ids_per_batch": 4, "data.images_per_id": 2,
    "eval.batch_size": 32, "eval.num_trials": 2, "eval.modes": ("all",),
    "eval.shots": ("single",), "eval.max_rank": 5, "log.every_steps": 1, "log.progress": False,
    "pretrain.enabled": False,  # mechanics tests start from random weights
    # Long enough for a stop signal to land mid-stage (tests/test_preemption.py); a tiny step
    # costs milliseconds next to a compile.
    "teacher.epochs": 2, "teacher.steps_per_epoch": TEACHER_STEPS // 2,
    "distill.epochs": 2, "distill.steps_per_epoch": STUDENT_STEPS // 2,
}
PRETRAIN = {  # with TINY, where a test runs the pretrain stage
    "pretrain.enabled": True, "pretrain.num_ids": 6, "pretrain.num_test_ids": 3,
    "pretrain.images_per_camera": 2, "pretrain.epochs": 1,
    "pretrain.steps_per_epoch": 2,
}


def arguments(values: dict) -> list[str]:
  """--config.* arguments for `values` (tuples written as Python literals)."""
  return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
          for k, v in values.items()]


def overrides(tmp_dir: str, **extra) -> list[str]:
  """--config.* arguments of the tiny run with its data under `tmp_dir`; `extra` on top."""
  return arguments(dict(TINY, **{"data.root": os.path.join(tmp_dir, "synthetic"),
                                 "pretrain.data_root": os.path.join(tmp_dir,
                                                                    "synthetic_pretrain"),
                                 "data.prepared_dir": os.path.join(tmp_dir, "tfds")}, **extra))


NETWORK = {name: TINY[name] for name in ("model.depth", "model.width", "model.non_local")}
