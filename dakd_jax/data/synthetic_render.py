"""Drawing and rendering of synthetic persons and cameras, shared by the synthetic tree writers.

Part of the demo data flow: the tree writers in `synthetic.py` decide which identities, cameras and
files a tree has, and call `draw_person`, `draw_camera` and `render` here for the pixels. Each
identity is a drawn "person". Cues that survive the modality change: body height and width, head
size, where the upper garment ends, the lower garment's cut (trousers, skirt, shorts), the
garments' patterns (stripes, checks, diagonals; frequency, orientation), a bag at one side. Garment
colours come from a small shared wardrobe and a pattern's two materials always differ clearly in
brightness, so patterns are legible in both modalities. Infrared grey levels follow each material's
visible luminance loosely (with a per-material deviation), as near-infrared reflectance does; hue
does not survive. Cameras add colour cast or gain, scale, background, blur and noise; images add
shift, scale, mirroring, brightness, clutter and noise.

Randomness comes only from the NumPy Generators passed in (`make_rng`), so the bytes depend on the
seeds (and the NumPy version) only.
"""
from __future__ import annotations

import numpy as np

# Part labels of the person map; 0 is background.
_SKIN, _HAIR, _UPPER, _LOWER, _BAG, _SHOES = 1, 2, 3, 4, 5, 6
_NUM_PARTS = 7


def make_rng(seed: int, *keys: int) -> np.random.Generator:
  """A NumPy Generator seeded from (seed, *keys): one independent stream per purpose and item."""
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


def draw_person(rng: np.random.Generator) -> dict:
  """One identity's shape, clothing layout and both modalities' part palettes.

  Returns a dict of scalars plus `visible_palette` [parts, 2, 3] and `infrared_palette`
  [parts, 2] floats in [0, 1] (per part: plain material, pattern material).
  """
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


def draw_camera(rng: np.random.Generator, is_visible: bool) -> dict:
  """One camera's fixed nuisances: scale, colour cast or gain, background, blur, noise.

  Returns a dict: scale, blur (passes), noise, gradient, horizon (floats / int), gain [3] and
  wall, floor [3] colours (grey for infrared).
  """
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


def render(person: dict, camera: dict, rng: np.random.Generator, n: int, height: int,
            width: int, is_visible: bool) -> np.ndarray:
  """n images of `person` seen by `camera`: uint8 [n, height, width, 3].

  `is_visible` picks the colour palette (else the grey infrared one, three equal channels before
  noise); `rng` draws the per-image pose, mirroring, brightness, clutter and noise.
  """
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
