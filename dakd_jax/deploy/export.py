"""Writes a verified export of the extractor: extractor.onnx, extractor.stablehlo, manifest.json.

The export stage's one call (`export_extractor`), after training and evaluation and outside the
training data flow: the caller hands over a model, its inference variables (params and
batch_stats of a checkpoint) and what to record (the checkpoint, its protocol results). Writes

  extractor.onnx       for onnxruntime and other ONNX runtimes (opset 23, weights inline);
  extractor.stablehlo  `jax.export` serialisation, loaded with `jax.export.deserialize`, lowered
                       for CPU and CUDA (and this host);
  manifest.json        input size and layout, normalisation, modality codes, embedding width,
                       the caller's entries, library versions, the verification result,

both files computing `extractor_function` (uint8 NHWC images and int32 modality codes in, unit
float32 embeddings out, dynamic batch), then verifies them (`verify.verify_export`) and writes
the manifest only if they pass.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np

from dakd_jax import augment
from dakd_jax import progress
from dakd_jax.deploy import extractor as extractor_lib
from dakd_jax.deploy import onnx_export
from dakd_jax.deploy import packages as packages_lib
from dakd_jax.deploy import verify as verify_lib


def default_platforms() -> tuple[str, ...]:
  """("cpu", "cuda") and this host's platform: an export made anywhere also serves a GPU."""
  return tuple(dict.fromkeys(("cpu", "cuda", jax.export.default_export_platform())))


def stablehlo_bytes(extract: Callable, specs, platforms) -> bytes:
  """`jax.export.export(jax.jit(extract))` for `platforms`, serialised; the batch stays symbolic.

  Load with `jax.export.deserialize(bytearray(data))`, call `.call(images, modality)`.
  """
  exported = jax.export.export(jax.jit(extract), platforms=tuple(platforms))(*specs)
  return bytes(exported.serialize())


def export_extractor(model, variables, *, image_height: int, image_width: int, out_dir: str,
                     manifest: dict, verify_images: np.ndarray | None = None,
                     verify_modality=None, tolerance: float = 1e-4, use_flip: bool = False,
                     platforms=None, verify_count: int = 8,
                     show_progress: bool = True) -> dict:
  """Writes extractor.onnx, extractor.stablehlo and manifest.json to out_dir, verified.

  model, variables: the network and its {'params', 'batch_stats'} (see `extractor_function`).
  image_height, image_width: the input size the files accept (the batch stays dynamic).
  manifest: the caller's JSON entries, e.g. {'checkpoint': path, 'results': protocol results}.
  verify_images: [n, H, W, 3] uint8 test images, or None for `verify_count` random ones (seed 0);
  verify_modality: [n] int32 codes of those images, or None (see `verify.verification_batches`).
  use_flip: embeddings averaged with the mirror image (config eval.flip).
  platforms: where the StableHLO file runs, as `jax.export` names them ("cpu", "cuda", "rocm",
  "tpu"); default `default_platforms()`. This host's platform must be among them.
  show_progress: with the output in a file, a line naming the current step at a steady pace
  (`progress.heartbeat`; a ResNet-50's conversion takes minutes).
  Returns the manifest written. Raises ExportError if the extra is missing (before any work) or
  a file differs from the JAX extractor by more than `tolerance` (then no manifest.json is
  written and the files stay for inspection); ValueError for bad arguments.
  """
  packages_lib.check_export_packages()
  _check_arguments(image_height, image_width, manifest, verify_images, verify_modality)
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, verify_lib.MANIFEST_FILE)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)  # It would vouch for files that may fail verification.
  platforms = tuple(platforms or default_platforms())
  extract = extractor_lib.extractor_function(model, variables, use_flip=use_flip)
  specs = extractor_lib.input_specs(image_height, image_width)
  if verify_images is None:
    source = f"{verify_count} random images (seed 0)"
    verify_images = verify_lib.random_verification_images(verify_count, image_height,
                                                          image_width)
  else:
    source = f"{len(verify_images)} given images"
  with progress.heartbeat("export", enabled=show_progress) as beat:
    beat.step("StableHLO serialisation")
    _write_bytes(os.path.join(out_dir, verify_lib.STABLEHLO_FILE),
                 stablehlo_bytes(extract, specs, platforms))
    beat.step("ONNX conversion")
    _write_bytes(os.path.join(out_dir, verify_lib.ONNX_FILE),
                 onnx_export.convert_to_onnx(extract, specs))
    beat.step(f"verification on {source}")
    try:
      differences = verify_lib.verify_export(out_dir, extract, verify_images, verify_modality,
                                             tolerance=tolerance)
    except packages_lib.ExportError as error:
      raise packages_lib.ExportError(
          f"{error}; no {verify_lib.MANIFEST_FILE} written") from error
  embedding = jax.eval_shape(extract, *(jax.ShapeDtypeStruct((1,) + s.shape[1:], s.dtype)
                                        for s in specs))
  content = build_manifest(
      manifest, image_height=image_height, image_width=image_width,
      embedding_width=int(embedding.shape[-1]), model=model, use_flip=use_flip,
      platforms=platforms,
      verification={"images": source, "tolerance": tolerance, "max_abs_diff": differences})
  _write_bytes(manifest_path, (json.dumps(content, indent=2) + "\n").encode())
  return content


def _check_arguments(image_height, image_width, manifest, verify_images, verify_modality):
  for name, value in (("image_height", image_height), ("image_width", image_width)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
  try:
    json.dumps(manifest)
  except (TypeError, ValueError) as error:
    raise ValueError("manifest must hold JSON values only (str, numbers, lists, dicts): "
                     f"{error}") from error
  if verify_images is None:
    if verify_modality is not None:
      raise ValueError("verify_modality was given without verify_images; pass both or neither")
    return
  images = np.asarray(verify_images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (image_height,
                                                                           image_width, 3):
    raise ValueError(f"verify_images must be uint8 [n, {image_height}, {image_width}, 3], got "
                     f"{images.dtype} {images.shape}; pass test images at the export size")
  if verify_modality is None:
    return
  codes = np.asarray(verify_modality)
  if codes.shape != images.shape[:1] or not np.isin(codes, (0, 1)).all():
    raise ValueError(f"verify_modality must be [{len(images)}] codes, 0 visible or 1 infrared, "
                     f"one per image; got shape {codes.shape}, values {np.unique(codes)[:5]}")


def model_description(model) -> dict[str, Any]:
  """The model's class and its simple fields (depth, width, stem mode, ...) as JSON values."""
  description = {"class": type(model).__name__}
  for name in getattr(model, "__dataclass_fields__", {}):
    value = getattr(model, name, None)
    if name not in ("parent", "name") and isinstance(value, (bool, int, float, str)):
      description[name] = value
  return description


def build_manifest(caller: dict, *, image_height: int, image_width: int, embedding_width: int,
                   model, use_flip: bool, platforms, verification: dict) -> dict:
  """The manifest.json content: `caller`'s entries plus those describing the files.

  Raises ValueError if a key of `caller` is one this function writes.
  """
  manifest = {
      "files": {"onnx": verify_lib.ONNX_FILE, "stablehlo": verify_lib.STABLEHLO_FILE},
      "inputs": {
          "images": {"name": extractor_lib.INPUT_NAMES[0],
                     "shape": ["batch", image_height, image_width, 3], "dtype": "uint8",
                     "layout": "NHWC", "channels": "RGB"},
          "modality": {"name": extractor_lib.INPUT_NAMES[1], "shape": ["batch"],
                       "dtype": "int32"}},
      "output": {"name": extractor_lib.OUTPUT_NAME, "shape": ["batch", embedding_width],
                 "dtype": "float32", "unit_norm": True, "flip_averaged": use_flip},
      "normalization": {"inside_graph": True, "formula": "(pixel / 255 - mean) / std",
                        "mean": list(augment.IMAGENET_MEAN), "std": list(augment.IMAGENET_STD)},
      "modality_codes": dict(extractor_lib.MODALITY_CODES),
      "embedding_width": embedding_width,
      "model": model_description(model),
      "onnx": {"opset": onnx_export.ONNX_OPSET},
      "stablehlo": {"platforms": list(platforms)},
      "verification": verification,
      "versions": packages_lib.library_versions(),
  }
  clashes = sorted(set(caller) & set(manifest))
  if clashes:
    raise ValueError(f"manifest keys {clashes} are written by the export itself; pass the "
                     "caller's entries under other names (e.g. 'checkpoint', 'results')")
  return {**caller, **manifest}


def _write_bytes(path: str, data: bytes) -> None:
  # Written beside the target and renamed, so a crash never leaves a truncated file.
  temporary = path + ".tmp"
  with open(temporary, "wb") as file:
    file.write(data)
  os.replace(temporary, path)
