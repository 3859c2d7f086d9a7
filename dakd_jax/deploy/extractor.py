"""The deployable function: uint8 images and modality codes in, unit embeddings out.

Both exported files (`dakd_jax.deploy.export`) compute `extractor_function`, and verification
compares them with it. It is evaluation's embedding (`evaluation.extract.make_embed_fn`,
method.md 5.3 and 7.1) with the variables fixed: ImageNet normalisation, inference-mode network
(BN running statistics), unit BNNeck embedding, float32 throughout.

One function with a modality input, rather than one per modality: the network routes each image
through its own stem (`ReIDResNet._stem`, a per-sample select), so one call serves a batch that
mixes visible and infrared images, a service loads one file, and the shared layers (about 97% of
the weights) are stored once instead of twice. The price is that both stems run on every image
(about 3% of the ResNet-50 FLOPs). A shared-stem network keeps the same two inputs and ignores
the modality, so a caller need not know which preset was trained.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dakd_jax import modalities
from dakd_jax.evaluation import extract

INPUT_NAMES = ("images", "modality")
OUTPUT_NAME = "embedding"
MODALITY_CODES = modalities.CODES


def extractor_function(model, variables, *, use_flip: bool = False) -> Callable:
  """Returns extract(images, modality) -> embeddings with `variables` closed over as constants.

  images: [batch, H, W, 3] uint8 RGB; modality: [batch] int32, 0 visible / 1 infrared (any other
  value takes the visible stem; ignored by a shared-stem network). Returns [batch, D] float32
  unit BNNeck embeddings in inference mode. The network runs in float32 whatever `model.dtype`
  is (a bf16-trained network exports in float32), and floating variables are cast to float32.
  `use_flip` averages the embeddings of each image and its mirror, then re-normalises (config
  eval.flip). The function is pure, so `jax.jit` or `jax.export` can trace it.
  """
  if getattr(model, "dtype", jnp.float32) != jnp.float32:
    model = model.clone(dtype=jnp.float32)
  constants = jax.tree.map(_as_float32_constant, variables)
  embed = extract.make_embed_fn(model, use_flip=use_flip)

  def extract_embeddings(images, modality):
    return embed(constants, images, modality, None)  # no random view: the key is unused

  return extract_embeddings


def _as_float32_constant(leaf):
  # Host NumPy arrays: traced functions embed them as constants, whatever device held them.
  value = np.asarray(leaf)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def input_specs(image_height: int, image_width: int) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Abstract inputs with a symbolic batch: ([batch, H, W, 3] uint8, [batch] int32)."""
  batch, = jax.export.symbolic_shape("batch")
  return (jax.ShapeDtypeStruct((batch, image_height, image_width, 3), jnp.uint8),
          jax.ShapeDtypeStruct((batch,), jnp.int32))
