"""Demo: the whole pipeline on a generated cross-modal dataset, sized for 2 CPU cores.

Command (the README's first command runs this):
  python run.py --config=configs/demo.py --workdir=workdirs/demo

Generates a small SYSU-MM01-style tree at data/synthetic_sysu and a pretraining tree of other
persons at data/synthetic_pretrain (seeded, reused when present), prepares them, pretrains a
width-reduced ResNet-18 on the second (the stand-in for ImageNet weights), trains the teacher
from it, distils a student with DAKD and prints the cross-modal evaluation table of both.
Inputs are 96x48 so the last stage stays 6x3 (XLA:CPU is 10-40x slower when a 3x3 conv sees
less than 3x3).
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
  # No ImageNet file here: a short identity-classifier training on other synthetic persons
  # stands in for it (see dakd_jax/train/pretrain.py); from random weights the teacher stays
  # at chance across modalities in a CPU budget.
  config.pretrain.enabled = True
  config.pretrain.data_root = "data/synthetic_pretrain"

  config.model.depth = 18
  config.model.width = 16

  config.teacher.epochs = 6
  config.teacher.steps_per_epoch = 20
  config.teacher.warmup_epochs = 1
  config.teacher.decay_epochs = (4, 5)
  config.teacher.lr = 3.5e-4  # the method's base rate; 1e-3 undoes the pretraining
  config.teacher.eval_every_epochs = 3
  config.teacher.eval_start_epoch = 0

  config.distill.epochs = 3
  config.distill.steps_per_epoch = 20
  config.distill.lr = 3.5e-4
  config.distill.eval_every_epochs = 3

  config.eval.modes = ("all", "indoor")
  config.eval.shots = ("single", "multi")
  config.eval.num_trials = 10
  config.eval.batch_size = 64

  config.checkpoint.every_steps = 40
  config.log.every_steps = 10
  return config
