"""Deterministic synthetic visible-infrared re-ID datasets, written in the real on-disk layouts.

First step of the demo data flow: `ensure_synthetic` writes a SYSU-MM01-style or RegDB-style tree
(method.md 6.1, 6.2) that the real readers, protocols and TFDS builders read like the real sets.

Each identity is a drawn "person". Cues that survive the modality change: body height and width,
head size, where the upper garment ends, the lower garment's cut (trousers, skirt, shorts), the
garments' patterns (stripes, checks, diagonals; frequency, orientation), a bag at one side.
Garment colours come from a small shared wardrobe and a pattern's two materials always differ
clearly in brightness, so patterns are legible in both modalities. Infrared grey levels follow
each material's visible luminance loosely (with a per-material deviation), as near-infrared
reflectance does; hue does not survive. Cameras add colour cast or gain, scale, background,
blur and noise; images add shift, scale, mirroring, brightness, clutter and noise. A raw colour
pixel nearest neighbour thus matches within the visible modality but is near chance across
modalities; grey, contrast-normalised pixels do better across modalities but stay well below
the within-modality match (tests/test_synthetic.py).

Every camera and every (identity, camera) batch has its own NumPy Generator seeded from (seed,
dataset tag, keys): the bytes depend on the parameters (and the NumPy and Pillow versions) only,
not on the generation order. Images are saved with Pillow as JPEG (quality 90, SYSU) or BMP
(RegDB).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image

FORMAT_VERSION = 3
MARKER_NAME = "synthetic_dataset.json"
JPEG_QUALITY = 90
VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
# Every identity appears in one or both cameras of each pair, so indoor (1, 2) and all-search
# galleries and the infrared queries are never empty for a test identity.
_CAMERA_PAIRS = ((1, 2), (4, 5), (3, 6))
_DATASET_TAG = {"sysu": 1, "regdb": 2}
# Part labels of the person map; 0 is background.
_SKIN, _HAIR, _UPPER, _LOWER, _BAG, _SHOES = 1, 2, 3, 4, 5, 6
_NUM_PARTS = 7


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


# Garment colours: a small shared wardrobe (jittered per identity), so that colour alone rarely
# names a person and the layout and patterns carry much of the identity, as on real sets.
_WARDROBE = np.array([
    [0.08, 0.08, 0.1], [0.92, 0.92, 0.9], [0.5, 0.5, 0.52], [0.12, 0.16, 0.45],
    [0.75, 0.12, 0.12], [0.15, 0.55, 0.2], [0.9, 0.8, 0.15], [0.82, 0.72, 0.55],
    [0.45, 0.28, 0.12], [0.25, 0.5, 0.85], [0.6, 0.2, 0.6], [0.95, 0.5, 0.15]])
_LUMA = np.array([0.299, 0.587, 0.114])


def _garment_colours(rng: np.random.Generator) -> np.ndarray:
  """[2, 3] RGB: a wardrobe colour and a pattern colour that differs from it in brightness."""
  luma = _WARDROBE @ _LUMA
  first = rng.integers(len(_WARDROBE))
  others = np.flatnonzero(np.abs(luma - luma[first]) > 0.3)
  chosen = _WARDROBE[[first, rng.choice(others)]]
  return np.clip(chosen + rng.uniform(-0.06, 0.06, size=(2, 3)), 0.0, 1.0)


def _draw_person(rng: np.random.Generator) -> dict:
  """One identity's shape, clothing layout and both modalities' part palettes."""
  person = dict(
      height=rng.uniform(0.74, 0.96), width=rng.uniform(0.32, 0.62),
      head=rng.uniform(0.05, 0.09), split=rng.uniform(0.40, 0.62),
      lower_cut=rng.integers(3), upper_pattern=rng.integers(5), lower_pattern=rng.integers(5),
      upper_freq=rng.integers(2, 5), lower_freq=rng.integers(2, 5),
      bag_side=rng.integers(-1, 2), bag_size=rng.uniform(0.14, 0.3),
      bag_top=rng.uniform(0.35, 0.55))
  colours = rng.uniform(0.05, 0.95, size=(_NUM_PARTS, 2, 3))
  colours[_UPPER], colours[_LOWER] = _garment_colours(rng), _garment_colours(rng)
  colours[_SKIN] = rng.uniform(0.25, 0.85) * np.array([1.0, 0.82, 0.68])
  colours[_HAIR] = rng.uniform(0.05, 0.45) * np.array([1.0, 0.85, 0.7])
  colours[_SHOES] = rng.uniform(0.05, 0.35)
  # Near-infrared brightness (SYSU's infrared cameras are near-infrared) follows visible
  # brightness only loosely: it tracks each material's luminance, plus a per-material
  # deviation, and says nothing about hue. Skin, hair and bags get their own levels.
  temps = 0.15 + 0.7 * colours @ _LUMA + rng.uniform(-0.08, 0.08, size=(_NUM_PARTS, 2))
  temps[_SKIN] = rng.uniform(0.8, 0.95)
  temps[_HAIR] = rng.uniform(0.4, 0.6)
  temps[_BAG] = rng.uniform(0.12, 0.35, size=2)
  person["visible_palette"], person["infrared_palette"] = colours, np.clip(temps, 0.0, 1.0)
  return person


def _draw_camera(rng: np.random.Generator, is_visible: bool) -> dict:
  """One camera's fixed nuisances: scale, colour cast or gain, background, blur, noise."""
  camera = dict(scale=rng.uniform(0.84, 1.0), blur=int(rng.integers(0, 2) + (not is_visible)),
                noise=rng.uniform(0.01, 0.035), gradient=rng.uniform(-0.2, 0.2),
                horizon=rng.uniform(0.55, 0.8))
  if is_visible:
    camera["gain"] = rng.uniform(0.8, 1.2, size=3)
    camera["wall"], camera["floor"] = rng.uniform(0.15, 0.85, size=(2, 3))
  else:
    camera["gain"] = np.full(3, rng.uniform(0.8, 1.15))
    camera["wall"], camera["floor"] = np.full((2, 3), rng.uniform(0.08, 0.3))
  return camera


def _stripes(values: np.ndarray, frequency: float) -> np.ndarray:
  return (np.floor(values * frequency) % 2).astype(bool)


def _pattern(kind: int, frequency: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Garment pattern bit: kind 0 plain, 1 horizontal stripes, 2 vertical, 3 checks, 4 diagonal.

  u, v: garment coordinates (u 0..1 across the shoulders, v 0..1 down the garment), broadcast.
  """
  u, v = np.broadcast_arrays(u, v)
  if kind == 0:
    return np.zeros(u.shape, bool)
  if kind == 3:
    return _stripes(u, frequency) ^ _stripes(v, frequency)
  return _stripes({1: v, 2: u, 4: 0.7 * (u + v)}[kind], frequency)


def _person_map(person: dict, scale: np.ndarray, shift: np.ndarray, height: int, width: int):
  """Part labels and pattern bits of n images of one person.

  Args: scale [n] (person size factor), shift [n, 2] (pixels, y and x).
  Returns: labels [n, H, W] int64 in 0.._NUM_PARTS-1, bits [n, H, W] bool.
  """
  body_h = (person["height"] * scale * height)[:, None, None]
  top = (height - body_h) / 2 + shift[:, 0, None, None]
  # v runs 0..1 from the top of the head to the soles; u is in shoulder widths from the centre.
  v = (np.arange(height)[None, :, None] - top) / body_h
  u = ((np.arange(width)[None, None, :] - width / 2 - shift[:, 1, None, None])
       / (person["width"] * scale * width)[:, None, None])
  au, r, split = np.abs(u), person["head"], person["split"]
  labels = np.zeros(np.broadcast_shapes(v.shape, u.shape), np.int64)
  # Head: an ellipse of radius r (in body heights), hair on its upper part.
  head_u = u * person["width"] * width / (0.8 * r * person["height"] * height)
  head = head_u ** 2 + ((v - r) / r) ** 2 < 1
  labels[head] = _SKIN
  labels[head & (v < 0.7 * r)] = _HAIR
  shoulder = 2.1 * r
  garment_v = (v - shoulder) / (split - shoulder)
  torso = (v >= shoulder) & (v < split) & (au < 0.5 - 0.08 * garment_v)
  sleeve = (v >= shoulder + 0.02) & (v < shoulder + 0.32) & (au >= 0.5) & (au < 0.64)
  hand = (v >= shoulder + 0.32) & (v < shoulder + 0.38) & (au >= 0.51) & (au < 0.62)
  labels[torso | sleeve] = _UPPER
  labels[hand] = _SKIN
  leg_v = (v - split) / (0.96 - split)
  legs = (v >= split) & (v < 0.96) & (au < 0.42) & (au >= 0.07 * np.clip(leg_v * 3 - 0.3, 0, 1))
  cut = person["lower_cut"]
  if cut == 0:  # trousers
    lower = legs
  elif cut == 1:  # skirt, widening, with bare legs below
    lower = (leg_v >= 0) & (leg_v < 0.5) & (au < 0.42 + 0.2 * leg_v)
  else:  # shorts
    lower = legs & (leg_v < 0.35)
  labels[legs & (au >= 0.12) & (au < 0.3)] = _SKIN
  labels[lower] = _LOWER
  labels[(v >= 0.96) & (v < 1.0) & (au < 0.34) & (au >= 0.06)] = _SHOES
  bits = np.where(labels == _UPPER, _pattern(person["upper_pattern"], person["upper_freq"],
                                             u + 0.5, garment_v),
                  _pattern(person["lower_pattern"], person["lower_freq"], u + 0.5, leg_v))
  if person["bag_side"] != 0:
    side_u = u * person["bag_side"]
    bag = ((side_u >= 0.6) & (side_u < 0.6 + 1.4 * person["bag_size"])
           & (v >= person["bag_top"]) & (v < person["bag_top"] + person["bag_size"]))
    labels[bag] = _BAG
  return labels, bits & ((labels == _UPPER) | (labels == _LOWER))


def _background(camera: dict, rng: np.random.Generator, n: int, height: int, width: int,
                is_visible: bool) -> np.ndarray:
  """Wall above a floor line, a vertical gradient and a few clutter boxes: [n, H, W, 3] float."""
  rows = np.arange(height)[None, :, None, None] / height
  horizon = camera["horizon"] + rng.uniform(-0.03, 0.03, size=(n, 1, 1, 1))
  images = np.where(rows < horizon, camera["wall"], camera["floor"]) * (1 + camera["gradient"]
                                                                        * (rows - 0.5))
  images = np.broadcast_to(images, (n, height, width, 3)).copy()
  ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
  for index in range(n):
    for _ in range(rng.integers(0, 3)):
      y0, x0 = rng.integers(0, height), rng.integers(-width // 4, width)
      box = ((ys >= y0) & (ys < y0 + rng.integers(height // 10, height // 3))
             & (xs >= x0) & (xs < x0 + rng.integers(width // 10, width // 3)))
      colour = rng.uniform(0.05, 0.95, size=3) if is_visible else rng.uniform(0.05, 0.55)
      images[index][box] = colour
  return images


def _smooth(images: np.ndarray, passes: int) -> np.ndarray:
  """Separable [1, 2, 1] / 4 blur over H and W, applied `passes` times (edges replicated)."""
  for _ in range(passes):
    for axis in (1, 2):
      padded = np.concatenate([np.take(images, [0], axis), images, np.take(images, [-1], axis)],
                              axis)
      size = images.shape[axis]
      images = (np.take(padded, range(0, size), axis) + 2 * images
                + np.take(padded, range(2, size + 2), axis)) / 4
  return images


def _render(person: dict, camera: dict, rng: np.random.Generator, n: int, height: int,
            width: int, is_visible: bool) -> np.ndarray:
  """n images of `person` seen by `camera`: uint8 [n, height, width, 3]."""
  scale = camera["scale"] * rng.uniform(0.92, 1.04, size=n)
  shift = rng.uniform(-1, 1, size=(n, 2)) * np.array([0.05 * height, 0.12 * width])
  labels, bits = _person_map(person, scale, shift, height, width)
  # Seen from the front or the back: half of the images are mirrored (bag side, diagonals).
  mirrored = rng.random(n) < 0.5
  labels[mirrored], bits[mirrored] = labels[mirrored, :, ::-1], bits[mirrored, :, ::-1]
  if is_visible:
    colours = person["visible_palette"][labels, bits.astype(np.int64)]
  else:
    colours = person["infrared_palette"][labels, bits.astype(np.int64)][..., None]
  images = np.where((labels > 0)[..., None], colours,
                    _background(camera, rng, n, height, width, is_visible))
  brightness = rng.uniform(0.85, 1.15, size=(n, 1, 1, 1))
  images = _smooth(images * camera["gain"] * brightness, camera["blur"])
  images = images + rng.normal(0.0, camera["noise"], size=images.shape[:3] + (1,))
  if is_visible:  # colour sensors add some per-channel noise as well
    images = images + rng.normal(0.0, 0.01, size=images.shape)
  return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)


def _check_sizes(**sizes: tuple[int, int]) -> None:
  """Raises ValueError for a size (given as (value, minimum)) that is not an int >= minimum."""
  for name, (value, minimum) in sizes.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f"synthetic dataset: {name} must be an integer >= {minimum}, got "
                       f"{value!r}.")


def _prepare_root(root: str) -> None:
  if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
    raise FileExistsError(
        f"synthetic dataset: {root} exists and is not an empty folder; refusing to write into "
        "it. Choose a new folder (or delete this one if it is yours).")
  os.makedirs(root, exist_ok=True)


def write_sysu_tree(root: str, *, num_train_ids: int = 36, num_val_ids: int = 4,
                    num_test_ids: int = 24, images_per_camera: int = 10, height: int = 128,
                    width: int = 64, seed: int = 0) -> None:
  """Writes a SYSU-MM01-style tree (method.md 6.1) into the empty or absent folder `root`.

  Layout: `cam1..cam6/<identity:04d>/<image:04d>.jpg` (visible 1, 2, 4, 5; infrared 3, 6; images
  `height` x `width` RGB, JPEG quality 90, numbered from 0001) and `exp/{train,val,test}_id.txt`
  (first line: comma-separated ids ascending). Identities are non-contiguous ints from
  1..~1.1 x total. Each identity is in one or both cameras of each pair (1, 2), (4, 5), (3, 6),
  with `images_per_camera` images per camera folder; the multi-shot protocol needs >= 10.

  Raises ValueError for sizes below 1 (ids, images) or 16 (pixels),
  FileExistsError when `root` exists and is not an empty folder.
  """
  _check_sizes(num_train_ids=(num_train_ids, 1), num_val_ids=(num_val_ids, 1),
               num_test_ids=(num_test_ids, 1), images_per_camera=(images_per_camera, 1),
               height=(height, 16), width=(width, 16), seed=(seed, 0))
  _prepare_root(root)
  tag, total = _DATASET_TAG["sysu"], num_train_ids + num_val_ids + num_test_ids
  split_rng = _rng(seed, tag, 0)
  ids = np.sort(split_rng.choice(np.arange(1, total + total // 10 + 2), total, replace=False))
  order = split_rng.permutation(ids)
  splits = {"train": order[:num_train_ids], "val": order[num_train_ids:total - num_test_ids],
            "test": order[total - num_test_ids:]}
  os.makedirs(os.path.join(root, "exp"))
  for name, members in splits.items():
    with open(os.path.join(root, "exp", f"{name}_id.txt"), "w", encoding="utf-8") as file:
      file.write(",".join(str(int(i)) for i in np.sort(members)) + "\n")
  cameras = {c: _draw_camera(_rng(seed, tag, 1, c), c in VISIBLE_CAMERAS) for c in range(1, 7)}
  for identity in ids.tolist():
    person_rng = _rng(seed, tag, 2, identity)
    person = _draw_person(person_rng)
    present = []
    for pair in _CAMERA_PAIRS:
      present += list(pair) if person_rng.random() < 0.5 else [pair[person_rng.integers(2)]]
    for camera in sorted(present):
      images = _render(person, cameras[camera], _rng(seed, tag, 3, identity, camera),
                       images_per_camera, height, width, camera in VISIBLE_CAMERAS)
      folder = os.path.join(root, f"cam{camera}", f"{identity:04d}")
      os.makedirs(folder)
      for index, image in enumerate(images, start=1):
        Image.fromarray(image).save(os.path.join(folder, f"{index:04d}.jpg"),
                                    quality=JPEG_QUALITY)
  for camera in range(1, 7):  # a camera that no identity reached still gets its folder
    os.makedirs(os.path.join(root, f"cam{camera}"), exist_ok=True)


def _write_regdb_idx(root: str, num_ids: int, names: dict, seed: int, num_trials: int) -> None:
  """idx/{train,test}_{visible,thermal}_{t}.txt: random half of the ids train, labels 0..C-1."""
  os.makedirs(os.path.join(root, "idx"))
  ids = np.arange(1, num_ids + 1)
  for trial in range(1, num_trials + 1):
    order = _rng(seed, _DATASET_TAG["regdb"], 4, trial).permutation(ids)
    halves = {"train": np.sort(order[:num_ids // 2]), "test": np.sort(order[num_ids // 2:])}
    for split, members in halves.items():
      for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
        lines = [f"{folder}/{identity}/{name} {label}"
                 for label, identity in enumerate(members.tolist())
                 for name in names[(folder, identity)]]
        path = os.path.join(root, "idx", f"{split}_{modality}_{trial}.txt")
        with open(path, "w", encoding="utf-8") as file:
          file.write("\n".join(lines) + "\n")


def write_regdb_tree(root: str, *, num_ids: int = 48, images_per_modality: int = 10,
                     height: int = 128, width: int = 64, seed: int = 0,
                     num_trials: int = 10) -> None:
  """Writes a RegDB-style tree (method.md 6.2) into the empty or absent folder `root`.

  Layout: `Visible/<id>/<sex>_<front|back>_v_<nnnnn>_<id>.bmp` and the same under `Thermal/`
  with `_t_` (ids 1..num_ids; a visible and a thermal image with the same number form a pair, as
  the dual-camera captures of the real set do), and `idx/{train,test}_{visible,thermal}_{t}.txt`
  for t = 1..num_trials: lines `<path relative to root> <label>`, by identity then image number.
  Per trial a random floor(num_ids / 2) identities train, the rest test; each split is relabelled
  0..C-1 by ascending identity (as the real files are believed to be, test files included).

  Raises ValueError for sizes below 1 (2 for num_ids; 16 pixels), FileExistsError when `root`
  exists and is not an empty folder.
  """
  _check_sizes(num_ids=(num_ids, 2), images_per_modality=(images_per_modality, 1),
               height=(height, 16), width=(width, 16), seed=(seed, 0), num_trials=(num_trials, 1))
  _prepare_root(root)
  tag, names = _DATASET_TAG["regdb"], {}
  cameras = {folder: _draw_camera(_rng(seed, tag, 1, code), folder == "Visible")
             for code, folder in ((1, "Visible"), (2, "Thermal"))}
  for identity in range(1, num_ids + 1):
    person_rng = _rng(seed, tag, 2, identity)
    person = _draw_person(person_rng)
    sex = ("female", "male")[person_rng.integers(2)]
    views = person_rng.choice(["front", "back"], size=images_per_modality)
    for code, folder in enumerate(("Visible", "Thermal"), start=1):
      images = _render(person, cameras[folder], _rng(seed, tag, 3, identity, code),
                       images_per_modality, height, width, folder == "Visible")
      os.makedirs(os.path.join(root, folder, str(identity)))
      names[(folder, identity)] = []
      for index, image in enumerate(images):
        number = (identity - 1) * images_per_modality + index + 1
        name = f"{sex}_{views[index]}_{folder[0].lower()}_{number:05d}_{identity}.bmp"
        Image.fromarray(image).save(os.path.join(root, folder, str(identity), name))
        names[(folder, identity)].append(name)
  _write_regdb_idx(root, num_ids, names, seed, num_trials)


_WRITERS = {"sysu": write_sysu_tree, "regdb": write_regdb_tree}


def _count_files(root: str) -> int:
  """Files under `root`, the marker excluded."""
  return sum(len([f for f in files if f != MARKER_NAME]) for _, _, files in os.walk(root))


def _resolve_params(kind: str, params: dict) -> dict:
  """The writer's full keyword set for `kind`: defaults filled in, unknown names refused."""
  if kind not in _WRITERS:
    raise ValueError(f"synthetic dataset kind must be one of {sorted(_WRITERS)}, got {kind!r}.")
  defaults = {name: parameter.default for name, parameter
              in inspect.signature(_WRITERS[kind]).parameters.items() if name != "root"}
  unknown = sorted(set(params) - set(defaults))
  if unknown:
    raise ValueError(f"synthetic {kind} dataset: unknown parameter(s) {unknown}; accepted: "
                     f"{sorted(defaults)}.")
  return {name: int(value) if isinstance(value, np.integer) else value
          for name, value in {**defaults, **params}.items()}


def _check_marker(root: str, wanted: dict) -> None:
  """Raises FileExistsError unless `root`'s marker matches `wanted` and its file count holds."""
  try:
    with open(os.path.join(root, MARKER_NAME), "r", encoding="utf-8") as file:
      found = json.load(file)
    num_files = found.pop("num_files")
  except (ValueError, KeyError, AttributeError) as error:
    raise FileExistsError(f"unreadable marker {os.path.join(root, MARKER_NAME)} ({error!r}); "
                          "delete the folder to regenerate the dataset.") from error
  if found != wanted:
    raise FileExistsError(
        f"synthetic dataset at {root} was generated with {found}, but {wanted} was asked for. "
        "Use another root for these parameters, or delete this folder to regenerate.")
  if num_files != _count_files(root):
    raise FileExistsError(
        f"synthetic dataset at {root} is damaged: its marker lists {num_files} files, the "
        f"folder holds {_count_files(root)}. Delete the folder to regenerate it.")


def ensure_synthetic(root: str, kind: str, **params) -> str:
  """Generates a synthetic dataset at `root` unless the same one is already there.

  Args:
    root: folder of the dataset (created with its parents when absent).
    kind: "sysu" (`write_sysu_tree`) or "regdb" (`write_regdb_tree`).
    **params: keyword arguments of that writer; missing ones take the writer's defaults.

  The tree is generated in a sibling temporary folder and moved into place once complete, with
  the marker `<root>/synthetic_dataset.json` (kind, resolved parameters, format version, file
  count). A later call with the same kind and parameters reuses the tree.

  Returns: the absolute path of `root`.
  Raises ValueError: unknown kind or parameter, or bad sizes. FileExistsError: `root` holds a
    marker for another kind, other parameters, another format version, or a different number of
    files (a damaged tree); or `root` is a file or a non-empty folder without a marker (never
    overwritten: it may be a user's data).
  """
  root = os.path.abspath(root)
  wanted = {"format_version": FORMAT_VERSION, "kind": kind,
            "params": _resolve_params(kind, params)}
  if os.path.isfile(os.path.join(root, MARKER_NAME)):
    _check_marker(root, wanted)
    return root
  if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
    raise FileExistsError(
        f"{root} exists and is not an empty folder, and has no {MARKER_NAME}: refusing to "
        "write a synthetic dataset into it. Choose another root or empty this folder.")
  temporary = f"{root}.partial-{os.getpid()}"
  shutil.rmtree(temporary, ignore_errors=True)
  try:
    _WRITERS[kind](temporary, **wanted["params"])
    with open(os.path.join(temporary, MARKER_NAME), "w", encoding="utf-8") as file:
      json.dump({**wanted, "num_files": _count_files(temporary)}, file, indent=2,
                sort_keys=True)
    if os.path.isdir(root):
      os.rmdir(root)  # empty, checked above
    os.replace(temporary, root)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  return root


def main(argv: list[str] | None = None) -> None:
  """Command line: `python -m dakd_jax.data.synthetic --root DIR --kind sysu|regdb [...]`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="dataset folder to create or reuse")
  parser.add_argument("--kind", required=True, choices=sorted(_WRITERS))
  for name in ("seed", "height", "width", "num_train_ids", "num_val_ids", "num_test_ids",
               "images_per_camera", "num_ids", "images_per_modality", "num_trials"):
    parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int,
                        help="writer default when omitted")
  args = vars(parser.parse_args(argv))
  root, kind = args.pop("root"), args.pop("kind")
  params = {name: value for name, value in args.items() if value is not None}
  try:
    print(f"synthetic {kind} dataset ready at {ensure_synthetic(root, kind, **params)}")
  except (ValueError, FileExistsError) as error:
    parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
  main(sys.argv[1:])
