"""Gradient-weighted activation maps (Grad-CAM) for retrieval: where the model looked.

Sits beside `analysis.py` after evaluation: it needs the model (to differentiate), the images
and embeddings of a query/gallery split, and writes one PNG. For a query q and a ranked gallery
image g, the "class score" of g is its similarity to the query, s = e_g . e_q, with e_q held
constant; the query's own score is its similarity to its top-1 match. With A the layer4 feature
map [h, w, C] of the scored image (the input of GeM pooling):
    weight_c = mean_{y,x} ds/dA[y, x, c],   map = ReLU(sum_c weight_c A[:, :, c]),
upsampled bilinearly to the image size and divided by its maximum (a map that is zero
everywhere stays zero). Inference mode, so images in a batch do not interact and one backward
pass of sum_i s_i gives every image's gradient.

The gradient with respect to A is taken by adding a zero perturbation to the input of the GeM
module through `flax.linen.intercept_methods`, so the model needs no change: d s / d
perturbation = d s / d A. `make_grad_cam` jits the whole computation once per batch shape.
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dakd_jax import augment
from dakd_jax.models import resnet

QUERY_COLOUR = (40, 90, 220)  # the frame colours of viz's ranked-result pictures
MATCH_COLOUR = (0, 170, 0)
MISMATCH_COLOUR = (220, 0, 0)
UNKNOWN_COLOUR = (128, 128, 128)
BORDER, GAP, QUERY_GAP, CAPTION, MARGIN, TITLE = 4, 6, 12, 14, 8, 18
OVERLAY_ALPHA = 0.5
COLORMAP = "inferno"  # luminance rises with the value: high maps are drawn brighter


@functools.lru_cache(maxsize=None)
def make_model_forward(model: resnet.ReIDResNet):
  """forward(variables, images, modality, perturbation) -> (feature_map, embedding).

  Cached per model, so `make_grad_cam(make_model_forward(model))` compiles once per model.

  images: uint8 [n, H, W, 3] (normalised here as in evaluation); modality: int32 [n];
  perturbation: float32 [n, h, w, C] added to the layer4 feature map before pooling, or None.
  Returns the unperturbed layer4 map float32 [n, h, w, C] and the unit embedding [n, D] of the
  perturbed map, inference mode. Raises ValueError if the model has no GeM pooling module.
  """

  def forward(variables, images, modality, perturbation):
    hits = []

    def perturb_pooling_input(next_fun, args, kwargs, context):
      if isinstance(context.module, resnet.GeM) and context.method_name == "__call__":
        hits.append(context.module.name)
        if perturbation is not None:
          args = (args[0].astype(jnp.float32) + perturbation,) + tuple(args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(perturb_pooling_input):
      out = model.apply(variables, augment.normalize(images), modality, train=False,
                        return_feature_map=True)
    if len(hits) != 1:
      raise ValueError(f"make_model_forward: expected one GeM pooling call in the model, saw "
                       f"{len(hits)}; the activation maps need the layer4 map as GeM's input.")
    return out["feature_map"], out["embedding"]

  return forward


def feature_gradients(forward, variables, images, modality, targets):
  """(feature_map, d score / d feature_map), score_i = embedding_i . targets_i.

  Args:
    forward: as returned by `make_model_forward` (or any function with its contract).
    targets: float32 [n, D], held constant.
  Returns: float32 [n, h, w, C] twice.
  """
  shape = jax.eval_shape(lambda: forward(variables, images, modality, None)[0]).shape

  def score(perturbation):
    feature_map, embedding = forward(variables, images, modality, perturbation)
    return jnp.sum(embedding * jax.lax.stop_gradient(targets)), feature_map

  gradients, feature_map = jax.grad(score, has_aux=True)(jnp.zeros(shape, jnp.float32))
  return feature_map, gradients


def grad_cam_maps(feature_map, gradients, image_hw):
  """Grad-CAM maps in [0, 1]: float32 [n, H, W] from [n, h, w, C] map and gradients."""
  weights = jnp.mean(gradients, axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", feature_map, weights))
  upsampled = jax.image.resize(cam, (cam.shape[0],) + tuple(image_hw), method="bilinear")
  peak = jnp.max(upsampled, axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, upsampled / jnp.where(peak > 0, peak, 1.0), 0.0)


@functools.lru_cache(maxsize=None)
def make_grad_cam(forward):
  """grad_cam(variables, images, modality, targets) -> maps float32 [n, H, W] in [0, 1].

  Jitted once per forward; it compiles once per batch shape.
  """

  def grad_cam(variables, images, modality, targets):
    feature_map, gradients = feature_gradients(forward, variables, images, modality, targets)
    return grad_cam_maps(feature_map, gradients, images.shape[1:3])

  return jax.jit(grad_cam)


def activation_picture(grad_cam, variables, images, modalities, embeddings, query_rows,
                       gallery_rows, path, *, identities=None, removed=None, top_k=4,
                       batch_size=16, scale=2, title=""):
  """Grad-CAM picture: one row per query, the query then its top-k gallery images, each with
  its map overlaid (frames: query blue, same identity green, other red, grey without ids).

  Args:
    grad_cam: from `make_grad_cam(make_model_forward(model))`.
    variables: the model's variables.
    images: the split's images, uint8 [N, H, W, 3] or any sequence whose [i] is one (only the
      drawn rows are read).
    modalities: int [N] codes; embeddings: float [N, D] unit embeddings (the evaluation's,
      used for the ranking and as the constant targets of the scores).
    query_rows: int [q] rows of the queries to draw; gallery_rows: int [G] rows of the gallery.
    identities: optional [N] labels for the frame colours.
    removed: optional bool [q, G], pairs the protocol removes (never shown).
    top_k: gallery images per query; batch_size: images per Grad-CAM call (fixed: one
      compilation, the last batch padded).

  Returns:
    {"path", "gallery" int [q, k] rows (-1 where fewer kept), "similarities" [q, k],
     "matches" bool [q, k] or None, "maps" float32 [q, 1 + k, H, W] (zeros where empty)}.
  """
  query_rows, gallery_rows = np.asarray(query_rows), np.asarray(gallery_rows)
  embeddings = np.asarray(embeddings, np.float32)
  similarity = embeddings[query_rows] @ embeddings[gallery_rows].T
  if removed is not None:
    similarity = np.where(removed, -np.inf, similarity)
  order = np.argsort(-similarity, axis=1, kind="stable")[:, :top_k]  # ties: lower position
  best = np.take_along_axis(similarity, order, axis=1)
  ranked = np.where(np.isfinite(best), gallery_rows[order], -1)
  # Row layout of the Grad-CAM batch: [query, its k ranked images] per query.
  panel_rows = np.concatenate([query_rows[:, None], ranked], axis=1)
  # A query without any kept gallery image has no top-1: target zero, map zero.
  top1 = np.where(ranked[:, :1, None] >= 0, embeddings[np.maximum(ranked[:, :1], 0)], 0.0)
  targets = np.concatenate([top1, np.repeat(embeddings[query_rows][:, None], top_k, axis=1)],
                           axis=1)
  maps = _maps_in_batches(grad_cam, variables, images, modalities, panel_rows, targets,
                          batch_size)
  matches = None
  if identities is not None:
    identities = np.asarray(identities)
    matches = (ranked >= 0) & (identities[np.maximum(ranked, 0)]
                               == identities[query_rows][:, None])
  _draw_rows(images, panel_rows, maps, matches, best, path, scale, title, identities)
  return {"path": path, "gallery": ranked, "similarities": np.where(ranked >= 0, best, np.nan),
          "matches": matches, "maps": maps}


def _maps_in_batches(grad_cam, variables, images, modalities, panel_rows, targets, batch_size):
  """Grad-CAM maps [q, 1 + k, H, W] of every panel, fixed-size batches (padding discarded)."""
  flat_rows, flat_targets = panel_rows.reshape(-1), targets.reshape(-1, targets.shape[-1])
  shown = np.flatnonzero(flat_rows >= 0)
  height, width = np.asarray(images[int(flat_rows[0])]).shape[:2]
  maps = np.zeros((flat_rows.size, height, width), np.float32)
  modalities = np.asarray(modalities)
  for start in range(0, shown.size, batch_size):
    part = shown[start:start + batch_size]
    padded = np.concatenate([part, np.full(batch_size - part.size, part[0])])
    batch = np.stack([np.asarray(images[int(flat_rows[i])], np.uint8) for i in padded])
    result = grad_cam(variables, batch, modalities[flat_rows[padded]].astype(np.int32),
                      flat_targets[padded].astype(np.float32))
    maps[part] = np.asarray(result)[:part.size]
  return maps.reshape(panel_rows.shape + (height, width))


def overlay(image, heat_map, alpha=OVERLAY_ALPHA):
  """uint8 [H, W, 3]: (1 - alpha) image + alpha colormap(heat_map), heat_map [H, W] in [0, 1]."""
  import matplotlib  # Deferred: pictures only.
  table = np.asarray(matplotlib.colormaps[COLORMAP](np.linspace(0.0, 1.0, 256)))[:, :3] * 255
  heat = table[np.clip(np.round(np.asarray(heat_map) * 255), 0, 255).astype(np.int64)]
  mixed = (1.0 - alpha) * np.asarray(image, np.float64) + alpha * heat
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def panel_box(row, column, image_hw, scale):
  """(left, top, right, bottom) of a panel's frame (right/bottom exclusive); column 0 = query."""
  panel_h, panel_w = image_hw[0] * scale + 2 * BORDER, image_hw[1] * scale + 2 * BORDER
  left = MARGIN + column * (panel_w + GAP) + (QUERY_GAP if column > 0 else 0)
  top = MARGIN + TITLE + row * (panel_h + CAPTION + GAP)
  return left, top, left + panel_w, top + panel_h


def _draw_rows(images, panel_rows, maps, matches, similarities, path, scale, title, identities):
  num_queries, num_panels = panel_rows.shape
  image_hw = maps.shape[2:]
  right, bottom = panel_box(num_queries - 1, num_panels - 1, image_hw, scale)[2:]
  canvas = Image.new("RGB", (right + MARGIN, bottom + CAPTION + MARGIN), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  draw.text((MARGIN, 2), title or "Grad-CAM: query | top matches (score = similarity to the "
            "query)", fill=(0, 0, 0), font=font)
  for row in range(num_queries):
    for column in range(num_panels):
      source = int(panel_rows[row, column])
      if source < 0:
        continue
      if column == 0:
        colour = QUERY_COLOUR
        caption = "query" if identities is None else f"query id {identities[source]}"
      else:
        colour = (UNKNOWN_COLOUR if matches is None
                  else MATCH_COLOUR if matches[row, column - 1] else MISMATCH_COLOUR)
        caption = f"#{column} s={similarities[row, column - 1]:.3f}"
      box = panel_box(row, column, image_hw, scale)
      draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
      tile = Image.fromarray(overlay(np.asarray(images[source]), maps[row, column]))
      canvas.paste(tile.resize((image_hw[1] * scale, image_hw[0] * scale), Image.NEAREST),
                   (box[0] + BORDER, box[1] + BORDER))
      draw.text((box[0], box[3] + 1), caption, fill=(0, 0, 0), font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path, format="PNG")
