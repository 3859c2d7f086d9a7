"""Loading an export directory and checking its files against the JAX extractor.

Runs after `dakd_jax.deploy.export` has written the files (and by itself on an existing export
directory): both files are loaded the way a service would (onnxruntime; `jax.export.deserialize`)
and fed the same uint8 batches as `extractor_function`; the largest difference decides.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

from dakd_jax.deploy import extractor as extractor_lib
from dakd_jax.deploy import packages as packages_lib
from dakd_jax.models import resnet

ONNX_FILE = "extractor.onnx"
STABLEHLO_FILE = "extractor.stablehlo"
MANIFEST_FILE = "manifest.json"


def random_verification_images(count: int, image_height: int, image_width: int,
                               seed: int = 0) -> np.ndarray:
  """[count, H, W, 3] uint8, uniform over 0..255 from `seed` (used when no dataset is given)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (count, image_height, image_width, 3), dtype=np.uint8)


def verification_batches(images: np.ndarray, modality=None) -> list[tuple[str, np.ndarray,
                                                                          np.ndarray]]:
  """The (name, images [b, H, W, 3] uint8, modality [b] int32) batches verification runs.

  All n images as visible, all as infrared, and a third batch with one image fewer (a second
  batch size) whose codes are `modality` when given, else alternating visible/infrared.
  """
  count = len(images)
  mixed = (np.arange(count) % 2) if modality is None else np.asarray(modality)
  last = max(count - 1, 1)
  return [("visible", images, np.full(count, resnet.VISIBLE_CODE, np.int32)),
          ("infrared", images, np.full(count, resnet.INFRARED_CODE, np.int32)),
          ("mixed", images[:last], mixed[:last].astype(np.int32))]


def load_artefacts(out_dir: str) -> dict[str, Callable]:
  """{file name: f(images, modality) -> np.ndarray} for the ONNX and StableHLO files in out_dir.

  Each runs on this host (onnxruntime's CPU provider; `jax.export.deserialize` on the default
  backend). Raises ExportError if the extra is missing, FileNotFoundError if a file is absent.
  """
  onnxruntime = packages_lib.check_export_packages()["onnxruntime"]
  onnx_path, stablehlo_path = (os.path.join(out_dir, n) for n in (ONNX_FILE, STABLEHLO_FILE))
  for path in (onnx_path, stablehlo_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"export file not found: {path!r}; run the export first")
  session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
  with open(stablehlo_path, "rb") as file:
    exported = jax.export.deserialize(bytearray(file.read()))
  call = jax.jit(exported.call)

  def run_onnx(images, modality):
    feeds = dict(zip(extractor_lib.INPUT_NAMES, (images, modality)))
    return session.run([extractor_lib.OUTPUT_NAME], feeds)[0]

  return {ONNX_FILE: run_onnx,
          STABLEHLO_FILE: lambda images, modality: np.asarray(call(images, modality))}


def verify_export(out_dir: str, extract: Callable, images: np.ndarray, modality=None, *,
                  tolerance: float = 1e-4) -> dict[str, float]:
  """Runs `verification_batches(images, modality)` through both files and through `extract`.

  images: [n, H, W, 3] uint8; modality: [n] int32 or None. Prints and returns the max abs
  difference of each file's embeddings from `jax.jit(extract)`'s over all batches, in float32.
  Raises ExportError naming each file above `tolerance` (or returning another shape).
  """
  files = load_artefacts(out_dir)
  reference = jax.jit(extract)
  worst = {name: 0.0 for name in files}
  for _, batch_images, batch_modality in verification_batches(images, modality):
    expected = np.asarray(reference(batch_images, batch_modality))
    for name, run in files.items():
      got = np.asarray(run(batch_images, batch_modality), np.float32)
      if got.shape != expected.shape:
        raise packages_lib.ExportError(
            f"{os.path.join(out_dir, name)} returned shape {got.shape} for a batch of "
            f"{len(batch_images)}, expected {expected.shape}")
      worst[name] = max(worst[name], float(np.max(np.abs(got - expected))))
  print("dakd_jax: export verification: " + ", ".join(
      f"{name} max |diff| {diff:.2e}" for name, diff in worst.items())
        + f" (tolerance {tolerance:.0e}, {len(images)} images, both modalities)")
  # `not <=` so that a NaN difference fails too.
  failed = {name: diff for name, diff in worst.items() if not diff <= tolerance}
  if failed:
    raise packages_lib.ExportError(
        "export verification failed: " + ", ".join(
            f"{name} differs from the JAX extractor by {diff:.3e}" for name, diff in failed.items())
        + f" > tolerance {tolerance:g} (files in {out_dir})")
  return worst
