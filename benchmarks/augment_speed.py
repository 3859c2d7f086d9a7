"""On-device batched augmentation vs the same augmentations per image in NumPy on the host.

Times one view's pipeline (method.md 5.2) on a batch of uint8 images: the jitted
`dakd_jax.augment.augment_batch` (batch already on the device, as inside the training step)
against a per-image NumPy loop doing the same operations with the same distributions, the way a
host data loader would. Prints both times per batch and their ratio. Part of the input-pipeline
benchmark, which imports `time_device_augment` and `time_host_augment`.

  python benchmarks/augment_speed.py                      # 64 x 288 x 144, SYSU visible view
  python benchmarks/augment_speed.py --view=infrared --batch=32 --height=384 --width=128
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dakd_jax import augment  # pylint: disable=g-import-not-at-top,wrong-import-position
from dakd_jax.data import specs  # pylint: disable=g-import-not-at-top,wrong-import-position

MEAN = np.array(augment.IMAGENET_MEAN, np.float32)
STD = np.array(augment.IMAGENET_STD, np.float32)
FILL = np.array(augment.ERASING_FILL, np.float32)
LUMA = np.array(augment.LUMINANCE_WEIGHTS, np.float32)


def _host_erase(rng, x, prob):
  height, width, _ = x.shape
  if rng.random() >= prob:
    return x
  for _ in range(augment.ERASING_ATTEMPTS):
    area = rng.uniform(*augment.ERASING_AREA) * height * width
    aspect = rng.uniform(*augment.ERASING_ASPECT)
    rect_h, rect_w = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
    if rect_h < height and rect_w < width:
      top, left = rng.integers(0, height - rect_h + 1), rng.integers(0, width - rect_w + 1)
      x[top:top + rect_h, left:left + rect_w] = FILL
      return x
  return x


def _host_cutswap(rng, x, settings):
  if rng.random() >= settings.cutswap_prob:
    return x
  exchanged = np.repeat(x[:, :, rng.integers(3)][..., None], 3, axis=2)
  if settings.cutswap_mode == "whole_image":
    return exchanged
  height, width, _ = x.shape
  rect_h = int(height * rng.uniform(*settings.cutswap_range))
  rect_w = int(width * rng.uniform(*settings.cutswap_range))
  top, left = rng.integers(0, height - rect_h + 1), rng.integers(0, width - rect_w + 1)
  x[top:top + rect_h, left:left + rect_w] = exchanged[top:top + rect_h, left:left + rect_w]
  return x


def _host_adaptive_gray(rng, x):
  case = rng.integers(4)
  if case < 3:
    return np.repeat(x[:, :, case][..., None], 3, axis=2)
  if rng.random() < 0.5:
    return np.repeat((x @ LUMA)[..., None], 3, axis=2)
  return x


def host_augment_image(rng, image, settings):
  """One image through one view's pipeline in NumPy: uint8 [H, W, 3] -> float32 normalised."""
  height, width, _ = image.shape
  pad = settings.pad
  if settings.flip_before_pad and rng.random() < settings.flip_prob:
    image = image[:, ::-1]
  padded = np.full((height + 2 * pad, width + 2 * pad, 3), settings.pad_value, np.uint8)
  padded[pad:pad + height, pad:pad + width] = image
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  image = padded[top:top + height, left:left + width]
  if not settings.flip_before_pad and rng.random() < settings.flip_prob:
    image = image[:, ::-1]
  x = (image.astype(np.float32) / 255.0 - MEAN) / STD
  if settings.use_cutswap:
    x = _host_cutswap(rng, x, settings)
  x = _host_erase(rng, x, settings.erasing_prob)
  if settings.use_adaptive_gray:
    x = _host_adaptive_gray(rng, x)
  if settings.use_channel_exchange:
    x = np.repeat(x[:, :, rng.integers(3)][..., None], 3, axis=2)
  return x


def time_host_augment(images, settings, repeats, seed=0):
  """Mean seconds per batch of the per-image NumPy pipeline over `repeats` batches."""
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for _ in range(repeats):
    np.stack([host_augment_image(rng, image, settings) for image in images])
  return (time.perf_counter() - start) / repeats


def time_device_augment(images, settings, repeats, seed=0):
  """(compile seconds, mean seconds per batch) of the jitted `augment_batch`, batch on device."""
  fn = jax.jit(augment.augment_batch, static_argnames="settings")
  images = jax.device_put(images)
  keys = jax.random.split(jax.random.key(seed), repeats + 1)
  start = time.perf_counter()
  fn(keys[0], images, settings).block_until_ready()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for key in keys[1:]:
    out = fn(key, images, settings)
  out.block_until_ready()
  return compile_s, (time.perf_counter() - start) / repeats


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", choices=specs.DATASET_NAMES, default="sysu_mm01")
  parser.add_argument("--view", choices=augment.VIEWS, default="visible")
  parser.add_argument("--cutswap_mode", choices=augment.CUTSWAP_MODES, default="region")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--height", type=int, default=288)
  parser.add_argument("--width", type=int, default=144)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  settings = augment.view_settings(args.view, specs.get_spec(args.dataset).augment,
                                   cutswap_mode=args.cutswap_mode)
  images = np.random.default_rng(0).integers(
      0, 256, (args.batch, args.height, args.width, 3), dtype=np.uint8)
  compile_s, device_s = time_device_augment(images, settings, args.repeats)
  host_s = time_host_augment(images, settings, max(1, args.repeats // 4))
  device = jax.devices()[0]
  print(f"view {args.dataset}/{args.view} ({args.cutswap_mode}), batch {args.batch} x "
        f"{args.height} x {args.width}, device {device.platform}:{device.device_kind}, "
        f"{os.cpu_count()} CPUs")
  print(f"device augment_batch (jit): {device_s * 1e3:9.2f} ms/batch "
        f"(compile {compile_s:.1f} s)")
  print(f"host NumPy per image:       {host_s * 1e3:9.2f} ms/batch")
  print(f"host / device ratio:        {host_s / device_s:9.2f}")


if __name__ == "__main__":
  main()
