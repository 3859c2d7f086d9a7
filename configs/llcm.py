"""LLCM (low-light cross-modality, DEEN CVPR 2023): the SYSU-MM01 recipe on LLCM's splits.

Command:
  python run.py --config=configs/llcm.py --workdir=workdirs/llcm
  python run.py --config=configs/llcm.py:released_code --workdir=workdirs/llcm_released

Needs the dataset at data/LLCM (see data/README.md and ../shared/docs/llcm.md) and, for
meaningful numbers, ImageNet weights (--config.model.init_weights=...). The recipe is method.md
sections 3-5 as for SYSU-MM01 (384 x 128, 8 identities x 4 images, the same augmentations:
random erasing covers 0.02-0.4 of the image, as the LLCM reference uses); the epoch length
follows the sampler (floor(max(#visible, #infrared) / 32) + 1). DEEN trains at 384 x 144: set
--config.data.image_width=144 to match it. Evaluation: infrared->visible and visible->infrared
(eval.llcm_vis_to_ir says which reading), 10 trials, same-identity same-camera filter.
Expected cost and numbers: not yet measured with this implementation; DAKD has no published
LLCM result (DEEN's and AGW's are in README "Results").
"""
from configs import base


def get_config(arg=None):
  """LLCM config; `arg` = optional preset name (see configs/base.py)."""
  config = base.get_config(arg)
  config.data.dataset = "llcm"
  config.data.root = "data/LLCM"
  config.data.image_height = 384
  config.data.image_width = 128
  config.data.images_per_id = 4
  return config
