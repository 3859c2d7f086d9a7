"""The public feature extractor: a trained network as `extractor(images_or_paths, modality)`.

For notebooks and services (torchreid's FeatureExtractor is the model): build it from any
checkpoint `stage=eval` accepts, hand it uint8 images or image files of one modality, get unit
float32 embeddings back. Images are resized like the prepared datasets (Lanczos, `load_image`),
embedded in fixed-size batches (the last one padded), so the jitted function compiles once.

  extractor = dakd_jax.Extractor.from_checkpoint("workdirs/demo/student")
  queries = extractor(["a.jpg", "b.jpg"], "infrared")        # float32 [2, D], unit rows
"""
from __future__ import annotations

import contextlib
import os
from typing import Mapping, Sequence

from absl import logging as absl_logging
import jax
import numpy as np
from PIL import Image

from dakd_jax import stage_checkpoints
from dakd_jax import modalities
from dakd_jax import sharding as sharding_lib
from dakd_jax.data import records
from dakd_jax.errors import CheckpointError, ConfigError
from dakd_jax.evaluation import extract
from dakd_jax.models import resnet


@contextlib.contextmanager
def quiet_library_warnings():
  """Hides the warnings Orbax logs through absl while a checkpoint is opened read-only (a
  notebook shows them as 'WARNING:absl' lines; run.py filters them the same way); errors still
  show. The previous verbosity is restored on the way out."""
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


def abstract_variables(model: resnet.ReIDResNet, image_size: tuple[int, int], mesh) -> dict:
  """{"params", "batch_stats"} of `model` as ShapeDtypeStructs replicated on `mesh`."""
  shapes = jax.eval_shape(lambda: resnet.init_variables(model, jax.random.key(0), image_size))
  sharding = sharding_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)


def load_weights_file(model: resnet.ReIDResNet, path: str, image_size: tuple[int, int],
                      mesh, *, log=None) -> dict:
  """Model variables from a weights file (`models.weights.load_pretrained`: our variable files,
  torchvision or the authors' files), replicated on `mesh`; `log` receives the note when an
  authors' single stem fills both stems."""
  from dakd_jax.models import weights  # Deferred: only for files.
  template = resnet.init_variables(model, jax.random.key(0), image_size)
  variables = weights.load_pretrained(template, path, depth=model.depth, log=log)
  return sharding_lib.replicate(variables, mesh)


class Extractor:
  """Unit embeddings of images with one trained network, over all local devices.

  Attributes: model, variables (replicated), image_size (height, width), batch_size, use_flip,
  source (where the weights came from), dim (embedding width).
  """

  def __init__(self, model: resnet.ReIDResNet, variables, *, image_size: tuple[int, int],
               batch_size: int = 64, use_flip: bool = False, source: str = "", mesh=None):
    """variables: {"params", "batch_stats"} of `model`; batch_size: images per compiled call
    (a multiple of the device count)."""
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh()
    if batch_size % self.mesh.size:
      raise ConfigError(f"batch_size {batch_size} does not divide over {self.mesh.size} "
                        f"devices; use a multiple of {self.mesh.size}")
    self.model = model
    self.variables = sharding_lib.replicate(variables, self.mesh)
    self.image_size = tuple(image_size)
    self.batch_size = batch_size
    self.use_flip = use_flip
    self.source = source
    self.dim = resnet.output_features(model.depth, model.width)
    self._embed_fn = extract.embed_function(model, use_flip=use_flip)

  @classmethod
  def from_checkpoint(cls, path: str, *, model_settings: Mapping | None = None,
                      image_size: tuple[int, int] | None = None, batch_size: int = 64,
                      use_flip: bool = False) -> "Extractor":
    """An extractor from a stage checkpoint (a teacher or student workdir, or its checkpoints/
    directory: the best evaluated step, else the newest) or a weights file.

    Args:
      path: the checkpoint or file.
      model_settings: a config's `model` section (depth, width, modality_specific_stem,
        non_local, gem_p, compute_dtype); default: the one stored in the checkpoint (required
        for weights files, which store no config).
      image_size: (height, width) images are resized to; default: the checkpoint's config.
    Raises:
      CheckpointNotFoundError: nothing at `path`. ConfigError: a weights file without
        model_settings/image_size. CheckpointError, WeightsError: weights that do not fit.
    """
    with quiet_library_warnings():
      return cls._from_checkpoint(path, model_settings, image_size, batch_size, use_flip)

  @classmethod
  def _from_checkpoint(cls, path, model_settings, image_size, batch_size,
                       use_flip) -> "Extractor":
    mesh = sharding_lib.make_mesh()
    if os.path.isfile(path):
      if model_settings is None or image_size is None:
        raise ConfigError(f"{path} is a weights file, which stores no config: pass "
                          "model_settings (a config's model section) and image_size=(H, W)")
      model = resnet.model_from_settings(model_settings)
      variables = load_weights_file(model, path, image_size, mesh)
      return cls(model, variables, image_size=image_size, batch_size=batch_size,
                 use_flip=use_flip, source=path, mesh=mesh)
    directory, step = stage_checkpoints.find_stage_checkpoint(
        path, hint="point it at a teacher or student workdir, its checkpoints/ folder, or a "
        "weights file")
    stored = stage_checkpoints.read_step_metadata(directory, step).get("config", {})
    if "model" not in stored and model_settings is None:
      raise CheckpointError(f"{directory} step {step} stores no config; pass model_settings")
    model = resnet.model_from_settings(model_settings or stored["model"])
    if image_size is None:
      image_size = (stored["data"]["image_height"], stored["data"]["image_width"])
    variables = stage_checkpoints.restore_variables(
        directory, step, abstract_variables(model, image_size, mesh))
    return cls(model, variables, image_size=image_size, batch_size=batch_size,
               use_flip=use_flip, source=f"{directory} step {step}", mesh=mesh)

  def load_images(self, images_or_paths) -> np.ndarray:
    """uint8 [n, H, W, 3] at the extractor's size from an array or a list of arrays/paths.

    Arrays: a batch [n, H, W, 3] or [n, H, W] (grey), one image [H, W, 3] or [H, W] (grey); a
    3-D array whose last axis is 3 is one colour image. Grey images are repeated to 3 channels,
    as grey files are.
    """
    height, width = self.image_size
    if isinstance(images_or_paths, np.ndarray) and (
        images_or_paths.ndim == 2 or (images_or_paths.ndim == 3
                                      and images_or_paths.shape[-1] == 3)):
      items: Sequence = [images_or_paths]  # One image.
    else:
      items = list(images_or_paths)
    out = np.empty((len(items), height, width, 3), np.uint8)
    for index, item in enumerate(items):
      if isinstance(item, (str, os.PathLike)):
        out[index] = records.load_image(os.fspath(item), height, width)
        continue
      image = np.asarray(item)
      given = image.shape
      if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
        image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image {index}: expected uint8 [H, W, 3] or [H, W] (grey), or a file "
                         f"path; got {image.dtype} {given}")
      if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))
      out[index] = image
    return out

  def __call__(self, images_or_paths, modality: str) -> np.ndarray:
    """float32 [n, D] unit embeddings of images of one modality ("visible" or "infrared").

    images_or_paths: uint8 [n, H, W, 3] (any size: resized), or a list of such images or of
    image file paths.
    """
    if modality not in modalities.CODES:
      raise ValueError(f"modality must be one of {modalities.MODALITIES}, got {modality!r}")
    images = self.load_images(images_or_paths)
    if not len(images):
      return np.zeros((0, self.dim), np.float32)
    source = [{"image": image} for image in images]
    codes = np.full(len(images), modalities.CODES[modality], np.int32)
    return extract.extract_embeddings(
        self._embed_fn, self.variables, source, np.arange(len(images)), codes,
        batch_size=self.batch_size, mesh=self.mesh, description=f"extract: {modality}",
        show_progress=False)
