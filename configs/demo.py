"""Demo: the whole pipeline on a generated cross-modal dataset, sized for 2 CPU cores.

Command (the README's first command runs this):
  python run.py --config=configs/demo.py --workdir=workdirs/demo

Generates a small SYSU-MM01-style tree at data/synthetic_sysu (seeded, reused when present),
prepares it, trains a width-reduced ResNet-18 teacher, distils a student with DAKD and prints the
cross-modal evaluation table of both. Inputs are 96x48 so the last stage stays 6x3 (XLA:CPU is
10-40x slower when a 3x3 conv sees less than 3x3). No ImageNet weights: random initialisation.
Expected: see README "Results" for the time and numbers measured on a 2-core machine.
"""
from configs import base


def get_config(arg=None):
  """Demo config; `arg` = optional preset name (see configs/base.py)."""
  config = base.get_config(arg)
  config.data.dataset = "sysu_mm01"
  config.data.root = "data/synthetic_sysu"
  config.data.image_height = 96
  config.data.image_width = 48
  config.data.ids_per_batch = 8
  config.data.images_per_id = 2
  config.data.num_workers = 0

  config.synthetic.enabled = True

  config.model.depth = 18
  config.model.width = 16

  config.teacher.epochs = 6
  config.teacher.steps_per_epoch = 20
  config.teacher.warmup_epochs = 1
  config.teacher.decay_epochs = (4, 5)
  config.teacher.lr = 1e-3
  config.teacher.eval_every_epochs = 3
  config.teacher.eval_start_epoch = 0

  config.distill.epochs = 3
  config.distill.steps_per_epoch = 20
  config.distill.lr = 1e-3
  config.distill.eval_every_epochs = 3

  config.eval.modes = ("all", "indoor")
  config.eval.shots = ("single", "multi")
  config.eval.num_trials = 10
  config.eval.batch_size = 64

  config.checkpoint.every_steps = 40
  config.log.every_steps = 10
  return config
