"""Pictures users look at: ranked results of a protocol or of new images, and the augmentations.

Host-side, after evaluation in the data flow (NumPy and PIL, exact pixels so tests can read the
frames back). `report.write_run_pictures` draws one ranked-result picture per setting; the
folder extraction uses `rank` and `draw_ranked_rows` for new images; the augmentation grid shows
what the network sees in training.

Ranked-result picture layout: one row per query; the query panel, then `QUERY_GAP` extra pixels,
then the top-k gallery panels. A panel is the image scaled by `scale` inside a `BORDER`-pixel
frame (query blue, true match green, false match red, grey when identities are unknown), with a
caption strip of `CAPTION` pixels below it. `panel_box` gives the geometry; `fit_scale` keeps
a picture within MAX_WIDTH pixels and a file holds at most ROWS_PER_PICTURE rows, so the picture
fits a screen at full size and its captions stay readable.

Augmentation grid (one row per image: raw, then each view):
  python -m dakd_jax.evaluation.pictures --dataset sysu_mm01 --out grid.png IMAGE [IMAGE ...]
"""
from __future__ import annotations

import argparse
import collections
import os
from typing import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dakd_jax import augment
from dakd_jax.data import specs
from dakd_jax.data.records import load_image
from dakd_jax.evaluation import metrics as metrics_lib

QUERY_COLOUR = (40, 90, 220)
MATCH_COLOUR = (0, 170, 0)
MISMATCH_COLOUR = (220, 0, 0)
UNKNOWN_COLOUR = (128, 128, 128)  # new images: no identity known
BORDER = 4  # frame width in pixels
GAP = 6  # between panels and between rows
QUERY_GAP = 12  # extra space between the query and its ranked list
CAPTION = 14  # caption strip below each panel
MARGIN = 8
TITLE = 18  # title strip at the top
# A ranked-result picture fits a screen at full size, so its 11-pixel captions stay readable:
# at most MAX_WIDTH pixels wide (images shrink to fit, never below MIN_IMAGE_WIDTH) and
# ROWS_PER_PICTURE query rows per file (more queries go to further files).
MAX_WIDTH = 1600
MIN_IMAGE_WIDTH = 32
ROWS_PER_PICTURE = 4
LARGEST_SCALE = 2  # small images are shown twice their size


def rank(query: np.ndarray, gallery: np.ndarray, *, top_k: int,
         removed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery positions per query by cosine distance 1 - q.g (ties: lower index first).

  Args:
    query: float [Q, D] unit embeddings; gallery: float [G, D] unit embeddings.
    top_k: list length (>= 1); shorter galleries are padded.
    removed: bool [Q, G], gallery images the protocol ignores for each query
      (`metrics.removed_pairs`); None keeps all.
  Returns:
    (order int64 [Q, top_k] gallery positions, -1 where padded;
     distance float32 [Q, top_k], inf where padded).
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  distance = 1.0 - np.asarray(query, np.float64) @ np.asarray(gallery, np.float64).T
  if removed is not None:
    distance = np.where(removed, np.inf, distance)
  order = np.argsort(distance, axis=1, kind="stable")[:, :top_k]
  values = np.take_along_axis(distance, order, axis=1)
  order = np.where(np.isfinite(values), order, -1)
  pad = top_k - order.shape[1]
  if pad > 0:
    order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
    values = np.pad(values, ((0, 0), (0, pad)), constant_values=np.inf)
  return order.astype(np.int64), values.astype(np.float32)


def panel_box(row: int, column: int, image_hw: tuple[int, int], scale: float) -> tuple:
  """(left, top, right, bottom) of a panel's frame (right/bottom exclusive); column 0 = query."""
  panel_h = int(round(image_hw[0] * scale)) + 2 * BORDER
  panel_w = int(round(image_hw[1] * scale)) + 2 * BORDER
  left = MARGIN + column * (panel_w + GAP) + (QUERY_GAP if column > 0 else 0)
  top = MARGIN + TITLE + row * (panel_h + CAPTION + GAP)
  return left, top, left + panel_w, top + panel_h


def fit_scale(image_hw: tuple[int, int], top_k: int, max_width: int = MAX_WIDTH) -> float:
  """The panel scale that keeps a row of the query and `top_k` panels within `max_width`
  pixels: LARGEST_SCALE when that fits, less for large images (never below MIN_IMAGE_WIDTH
  pixels of image width)."""
  fixed = 2 * MARGIN + (top_k + 1) * 2 * BORDER + top_k * GAP + QUERY_GAP
  fitting = (max_width - fixed) / ((top_k + 1) * image_hw[1])
  return min(float(LARGEST_SCALE), max(fitting, MIN_IMAGE_WIDTH / image_hw[1]))


def part_paths(path: str, num_rows: int, rows_per_picture: int = ROWS_PER_PICTURE) -> list[str]:
  """The files of a picture of `num_rows` rows: `path`, then `<stem>_part2.png`, ..."""
  stem, extension = os.path.splitext(path)
  parts = max(-(-num_rows // rows_per_picture), 1)
  return [path] + [f"{stem}_part{number}{extension}" for number in range(2, parts + 1)]


def draw_ranked_rows(query_images: Sequence[np.ndarray], ranked_images: Sequence[Sequence],
                     matches: np.ndarray | None, distances: np.ndarray, path: str, *,
                     query_captions: Sequence[str] | None = None, title: str = "",
                     scale: float | None = None) -> str:
  """Draws the ranked-result picture (layout in the module docstring) and saves it as PNG.

  Args:
    query_images: Q uint8 [H, W, 3] images (all the same size).
    ranked_images: Q lists of k uint8 [h, w, 3] images (resized to [H, W]) or None (padding:
      empty panel, no frame).
    matches: bool [Q, k]: green frame where True, red where False; None: grey frames
      (identities unknown, e.g. folders of new images).
    distances: float [Q, k], printed as '#rank d=distance'.
    scale: panel size over image size; None = `fit_scale` (the picture fits a screen).
  Returns: `path`.
  """
  height, width = np.asarray(query_images[0]).shape[:2]
  num_rows, top_k = np.asarray(distances).reshape(len(query_images), -1).shape
  scale = fit_scale((height, width), top_k) if scale is None else scale
  right, bottom = panel_box(num_rows - 1, top_k, (height, width), scale)[2:]
  canvas = Image.new("RGB", (right + MARGIN, bottom + CAPTION + MARGIN), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  draw.text((MARGIN, 2), title, fill=(0, 0, 0), font=font)
  for row in range(num_rows):
    caption = query_captions[row] if query_captions else "query"
    _panel(canvas, draw, font, query_images[row], panel_box(row, 0, (height, width), scale),
           QUERY_COLOUR, caption, scale)
    for column in range(top_k):
      image = ranked_images[row][column]
      if image is None:
        continue
      colour = (UNKNOWN_COLOUR if matches is None
                else MATCH_COLOUR if matches[row][column] else MISMATCH_COLOUR)
      _panel(canvas, draw, font, image, panel_box(row, column + 1, (height, width), scale),
             colour, f"#{column + 1} d={distances[row][column]:.3f}", scale)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path, format="PNG")
  return path


def _panel(canvas, draw, font, image, box, colour, caption, scale):
  left, top, right, bottom = box
  draw.rectangle((left, top, right - 1, bottom - 1), fill=colour)
  size = (right - left - 2 * BORDER, bottom - top - 2 * BORDER)
  tile = Image.fromarray(np.asarray(image, np.uint8)).resize(size, Image.NEAREST)
  canvas.paste(tile, (left + BORDER, top + BORDER))
  draw.text((left, bottom + 1), caption, fill=(0, 0, 0), font=font)


def pick_queries(num_available: int, count: int, seed: int) -> np.ndarray:
  """`count` distinct positions in 0..num_available-1 (all if fewer), seeded, ascending."""
  count = min(count, num_available)
  return np.sort(np.random.default_rng(seed).choice(num_available, count, replace=False))


def ranked_picture(source, meta: dict, embeddings: np.ndarray, query_rows: np.ndarray,
                   gallery_rows: np.ndarray, path: str, *, rule, top_k: int = 10,
                   num_queries: int = 8, queries: Sequence[int] | None = None, seed: int = 0,
                   title: str = "") -> dict:
  """Ranked-result picture of one protocol (e.g. SYSU infrared -> visible, trial 0).

  Args:
    source: the prepared test split (`source[i]['image']` uint8 [H, W, 3]).
    meta: its metadata ('identity', 'camera' int arrays [N]).
    embeddings: float [N, D] unit embeddings aligned with `source`.
    query_rows, gallery_rows: int rows of the protocol (`Evaluator.rows`).
    rule: the dataset's CameraRule (or its name); gallery images it ignores for a query are not shown.
    queries: positions in query_rows to show; None = `num_queries` random ones (seeded).
  More than ROWS_PER_PICTURE queries go to further files (`part_paths`).
  Returns:
    {'path' (the first file), 'paths' (all files), 'queries' [q] test rows, 'gallery' [q, k] test rows (-1 pad), 'matches' bool
     [q, k], 'distances' [q, k]}.
  """
  positions = (np.asarray(queries, np.int64) if queries is not None
               else pick_queries(len(query_rows), num_queries, seed))
  chosen = np.asarray(query_rows)[positions]
  gallery_rows = np.asarray(gallery_rows)
  identity, camera = np.asarray(meta["identity"]), np.asarray(meta["camera"])
  removed = metrics_lib.removed_pairs(rule, identity[chosen], camera[chosen],
                                      identity[gallery_rows], camera[gallery_rows])
  order, distances = rank(embeddings[chosen], embeddings[gallery_rows], top_k=top_k,
                          removed=removed)
  ranked = np.where(order >= 0, gallery_rows[np.maximum(order, 0)], -1)
  matches = (ranked >= 0) & (identity[np.maximum(ranked, 0)] == identity[chosen][:, None])
  paths = part_paths(path, len(chosen))
  for number, part in enumerate(paths):
    rows = slice(number * ROWS_PER_PICTURE, (number + 1) * ROWS_PER_PICTURE)
    draw_ranked_rows(
        [source[int(r)]["image"] for r in chosen[rows]],
        [[source[int(g)]["image"] if g >= 0 else None for g in row] for row in ranked[rows]],
        matches[rows], distances[rows], part,
        title=title + (f" ({number + 1}/{len(paths)})" if len(paths) > 1 else ""),
        query_captions=[f"id {identity[r]} cam {camera[r]}" for r in chosen[rows]])
  return {"path": path, "paths": paths, "queries": chosen, "gallery": ranked,
          "matches": matches, "distances": distances}


_AUGMENT_JIT = jax.jit(augment.augment_batch, static_argnames="settings")
_DENORMALIZE_JIT = jax.jit(augment.denormalize)


def default_views(dataset, **knobs):
  """The columns of the usual picture: visible (strong), channel-augmented visible, infrared.

  Args:
    dataset: a dataset name (its spec's augmentation recipe is used).
    **knobs: passed to `augment.view_settings` (cutswap_mode, cutswap_prob, ...).
  Returns:
    An ordered dict view name -> `AugmentSettings`.
  """
  recipe = specs.get_spec(dataset).augment
  return collections.OrderedDict(
      (view, augment.view_settings(view, recipe, **knobs))
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
  """`python -m dakd_jax.evaluation.pictures IMAGE ...`: the augmentation grid of images."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("images", nargs="+", help="image files, one grid row each")
  parser.add_argument("--dataset", choices=specs.DATASET_NAMES, default="sysu_mm01")
  parser.add_argument("--cutswap_mode", choices=augment.CUTSWAP_MODES, default="region")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="augmentation_grid.png")
  args = parser.parse_args(argv)
  height, width = specs.get_spec(args.dataset).image_size
  images = np.stack([load_image(p, height, width) for p in args.images])
  views = default_views(args.dataset, cutswap_mode=args.cutswap_mode)
  write_augmentation_grid(args.out, images, jax.random.key(args.seed), views)
  print(f"wrote {args.out}: {len(images)} rows x columns raw, {', '.join(views)}")


if __name__ == "__main__":
  main()
