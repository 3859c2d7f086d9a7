"""SYSU-MM01, the paper's headline setting: ResNet-50 at 384x128, 160 + 160 epochs.

Command:
  python run.py --config=configs/sysu.py --workdir=workdirs/sysu
  python run.py --config=configs/sysu.py:released_code --workdir=workdirs/sysu_released

Needs the dataset at data/SYSU-MM01 (see data/README.md) and, for the published numbers,
ImageNet weights: --config.model.init_weights=data/weights/resnet50-19c8e357.safetensors.
Expected cost and numbers: not yet measured with this implementation (no accelerator run yet).
Published (paper abstract): rank-1 76.31 (all-search, single-shot).
"""
from configs import base


def get_config(arg=None):
  """SYSU-MM01 config; `arg` = optional preset name (see configs/base.py)."""
  config = base.get_config(arg)
  config.data.dataset = "sysu_mm01"
  config.data.root = "data/SYSU-MM01"
  config.data.image_height = 384
  config.data.image_width = 128
  config.data.images_per_id = 4
  config.model.compute_dtype = "float32"
  return config
