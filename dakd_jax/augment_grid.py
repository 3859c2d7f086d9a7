"""A picture of the training augmentations: one row per image, one column per view.

Host-side tooling, outside the training step: it runs `augment.augment_batch` for each view,
de-normalises the result to uint8 and writes a PNG with PIL. Use it to eyeball what the network
sees (pad colour, crops, erasing boxes, CutSwap patches, gray channels).

Command line (images are resized to the dataset's input size):
  python -m dakd_jax.augment_grid --dataset sysu_mm01 --out grid.png IMAGE [IMAGE ...]
"""
import argparse
import collections
import os

import jax
import numpy as np
from PIL import Image

from dakd_jax import augment
from dakd_jax.data.records import load_image

_AUGMENT_JIT = jax.jit(augment.augment_batch, static_argnames="settings")
_DENORMALIZE_JIT = jax.jit(augment.denormalize)
INPUT_SIZE = {"sysu_mm01": (384, 128), "regdb": (288, 144)}  # (height, width), method.md 5.2


def default_views(dataset, **knobs):
  """The columns of the usual picture: visible (strong), channel-augmented visible, infrared.

  Args:
    dataset: "sysu_mm01" or "regdb".
    **knobs: passed to `augment.view_settings` (cutswap_mode, cutswap_prob, ...).
  Returns:
    An ordered dict view name -> `AugmentSettings`.
  """
  return collections.OrderedDict(
      (view, augment.view_settings(dataset, view, **knobs))
      for view in ("visible", "channel", "infrared"))


def augmentation_grid(images_uint8, key, settings_by_view):
  """Builds the grid array: rows = samples; columns = raw, then each view in mapping order.

  Key usage: `view_keys = jax.random.split(key, len(settings_by_view))`; column `j + 1` is
  `denormalize(augment_batch(view_keys[j], images, settings_j))`.

  Args:
    images_uint8: `[n, H, W, 3]` uint8.
    key: PRNG key.
    settings_by_view: non-empty mapping view name -> `augment.AugmentSettings`.
  Returns:
    `[n * H, (1 + V) * W, 3]` uint8 NumPy array.
  Raises:
    ValueError: bad image batch or empty / wrongly typed `settings_by_view`.
  """
  images = np.asarray(images_uint8)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"images_uint8: expected [n, H, W, 3] uint8, got shape {images.shape} "
                     f"dtype {images.dtype}.")
  if not settings_by_view or not all(isinstance(s, augment.AugmentSettings)
                                     for s in settings_by_view.values()):
    raise ValueError("settings_by_view must map view names to AugmentSettings "
                     "(see augment_grid.default_views), got "
                     f"{type(settings_by_view).__name__} {settings_by_view!r}.")
  columns = [images]
  on_device = jax.device_put(images)  # explicit transfers: fine under a strict transfer guard
  view_keys = jax.random.split(key, len(settings_by_view))
  for view_key, settings in zip(view_keys, settings_by_view.values()):
    augmented = _AUGMENT_JIT(view_key, on_device, settings)
    columns.append(jax.device_get(_DENORMALIZE_JIT(augmented)))
  n, height, width, _ = images.shape
  # [column, n, H, W, 3] -> [n, H, column, W, 3] -> one image.
  grid = np.stack(columns).transpose(1, 2, 0, 3, 4)
  return grid.reshape(n * height, len(columns) * width, 3)


def write_augmentation_grid(path, images_uint8, key, settings_by_view):
  """Writes the `augmentation_grid` of `images_uint8` to `path` as a PNG (tiles without gaps).

  Args:
    path: output file; missing parent folders are created.
    images_uint8, key, settings_by_view: as in `augmentation_grid`.
  Returns:
    The grid array that was written, `[n * H, (1 + V) * W, 3]` uint8.
  Raises:
    ValueError: as in `augmentation_grid`.
  """
  grid = augmentation_grid(images_uint8, key, settings_by_view)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  Image.fromarray(grid).save(path, format="PNG")
  return grid


def main(argv=None):
  """Command line entry point: loads images, writes the default grid of the dataset's views."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("images", nargs="+", help="image files, one grid row each")
  parser.add_argument("--dataset", choices=sorted(INPUT_SIZE), default="sysu_mm01")
  parser.add_argument("--cutswap_mode", choices=augment.CUTSWAP_MODES, default="region")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="augmentation_grid.png")
  args = parser.parse_args(argv)
  height, width = INPUT_SIZE[args.dataset]
  images = np.stack([load_image(p, height, width) for p in args.images])
  views = default_views(args.dataset, cutswap_mode=args.cutswap_mode)
  write_augmentation_grid(args.out, images, jax.random.key(args.seed), views)
  print(f"wrote {args.out}: {len(images)} rows x columns raw, {', '.join(views)}")


if __name__ == "__main__":
  main()
