"""Image corruptions of the corruption-robustness benchmark (SYSU-MM01-C, RegDB-C), seeded.

Chen et al., "Benchmarks for Corruption Invariant Person Re-identification" (NeurIPS 2021
datasets track) corrupt the visible test images with ImageNet-C's 15 corruptions, its 4 extra
ones (speckle noise, gaussian blur, spatter, saturate) and a rain of their own, at severities
1-5 (README "Robustness"). Nineteen come from the `imagecorruptions` package (the maintained
fork `imagecorruptions-imaug`, the optional `robustness` extra, which runs with numpy 2); rain
is written here from the benchmark's definition (`add_rain`).

Data flow: a prepared uint8 test image -> `corrupt_image` -> the evaluator's extraction, through
`CorruptedSource`, which corrupts the visible rows of a split on read. Every random draw of an
image comes from a seed made of (config seed, the image's path), never from the order in which
images are read: the same image is corrupted the same way on every run, with any batch size,
device count or number of reading threads.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from dakd_jax.errors import MissingExtraError
from dakd_jax.modalities import VISIBLE_CODE

# The benchmark's list, in its order (CIL-ReID datasets/make_dataloader.py).
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression", "speckle_noise",
               "gaussian_blur", "spatter", "saturate", "rain")
SEVERITIES = (1, 2, 3, 4, 5)
# ImageNet-C's four groups; the extra corruptions join the group of their kind (inferred: the
# benchmark reports no groups).
GROUPS = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "brightness", "spatter", "rain"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
# Config values besides a corruption name: "mixed" draws a corruption (and, with severity
# "all", a severity) per image, the benchmark's protocol; "all" evaluates every corruption.
MIXED, EVERY = "mixed", "all"
CHOICES = ("none", MIXED, EVERY) + CORRUPTIONS
SEVERITY_CHOICES = tuple(str(s) for s in SEVERITIES) + (EVERY,)
LIBRARY = "imagecorruptions-imaug"
# The smallest image every corruption takes: the library's 32 px a side, and rain's 60 px drops
# (severities 4-5) need a taller image.
MIN_HEIGHT, MIN_WIDTH = 61, 32


def is_sweep(corruption: str, severity: str) -> bool:
  """Whether the config values mean several evaluations: every corruption, or every severity of
  a named one ("mixed" with severity "all" is one evaluation: the severity is drawn per image)."""
  return corruption == EVERY or (corruption != MIXED and severity == EVERY)


MISSING_EXTRA_MESSAGE = ("eval.corruption needs the optional packages imagecorruptions-imaug "
                         "and opencv-python: pip install -e '.[robustness]'")
# The library draws from numpy's global generator: one image at a time, under its own seed, with
# the caller's generator state put back afterwards.
_GLOBAL_RANDOM_LOCK = threading.Lock()


def load_library():
  """The `imagecorruptions` module of the robustness extra. Raises MissingExtraError with the
  one-line install command when it (or OpenCV, which it and the rain need) is missing."""
  load_opencv()
  try:
    import imagecorruptions  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise MissingExtraError(MISSING_EXTRA_MESSAGE) from error
  return imagecorruptions


def load_opencv():
  """The `cv2` module (robustness extra); MissingExtraError naming the extra when missing."""
  try:
    import cv2  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise MissingExtraError(MISSING_EXTRA_MESSAGE) from error
  return cv2


def image_seed(seed: int, key: str) -> int:
  """A 63-bit seed of one image from the run's seed and the image's key (its relative path):
  independent of reading order, process and device count."""
  digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def draw_corruption(seed: int, key: str, corruption: str, severity: str) -> tuple[str, int]:
  """(corruption name, severity) of one image. `corruption` "mixed" draws one of CORRUPTIONS
  uniformly, `severity` "all" one of 1..5 (the benchmark's per-image choice), from the image's
  own seed; named values are returned as they are."""
  rng = np.random.default_rng([image_seed(seed, key), 1])
  name = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))] if corruption == MIXED else corruption
  level = int(rng.integers(1, 6)) if severity == EVERY else int(severity)
  return name, level


def rain_parameters(rng: np.random.Generator, height: int, width: int,
                    severity: int) -> dict[str, Any]:
  """The random part of the benchmark's rain (albumentations 0.5.2 RandomRain, as CIL-ReID calls
  it): drizzle (severity 1: area//770 drops 10 px long), heavy (2-3: area//600, 30 px) or
  torrential (4-5: area//500, 60 px); one slant for the image, int(uniform(-10, 10)); drop
  starts x in [slant, width] (slant < 0) or [0, width - slant], y in [0, height - length].
  Returns {'slant', 'drop_length', 'drops': int [n, 2] (x, y)}."""
  kind = {1: (770, 10), 2: (600, 30), 3: (600, 30), 4: (500, 60), 5: (500, 60)}[severity]
  area_per_drop, drop_length = kind
  if height <= drop_length:
    raise ValueError(f"rain at severity {severity} needs images taller than {drop_length} px, "
                     f"got {height}")
  slant = int(rng.uniform(-10, 10))
  count = height * width // area_per_drop
  low_x, high_x = (slant, width) if slant < 0 else (0, width - slant)
  drops = np.stack([rng.integers(low_x, high_x + 1, count),
                    rng.integers(0, height - drop_length + 1, count)], axis=1)
  return {"slant": slant, "drop_length": drop_length, "drops": drops.reshape(count, 2)}


def add_rain(image: np.ndarray, severity: int, slant: int, drop_length: int,
             drops: np.ndarray) -> np.ndarray:
  """The benchmark's rain on uint8 RGB [H, W, 3], given its random parameters: grey (200) lines
  1 px wide from each drop (x, y) to (x + slant, y + length), a box blur of side 2 + severity
  over the whole image, the HLS round trip of RandomRain (lightness x 1), then RandomBrightness
  with the fixed shift beta = -(0.05 + 0.05 severity): v -> trunc(clip(v + 255 beta, 0, 255))."""
  cv2 = load_opencv()
  drawn = np.ascontiguousarray(image, dtype=np.uint8).copy()
  for x, y in np.asarray(drops, np.int64).reshape(-1, 2):
    cv2.line(drawn, (int(x), int(y)), (int(x) + slant, int(y) + drop_length), (200, 200, 200), 1)
  blurred = cv2.blur(drawn, (2 + severity, 2 + severity))
  lightness = cv2.cvtColor(blurred, cv2.COLOR_RGB2HLS).astype(np.float32)
  rained = cv2.cvtColor(lightness.astype(np.uint8), cv2.COLOR_HLS2RGB)
  beta = -(0.05 + 0.05 * severity)
  table = np.clip(np.arange(256, dtype=np.float32) + beta * 255, 0, 255).astype(np.uint8)
  return table[rained]


def rain(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
  """The benchmark's rain corruption of uint8 RGB [H, W, 3], its drops drawn from `seed`."""
  parameters = rain_parameters(np.random.default_rng(seed), image.shape[0], image.shape[1],
                               severity)
  return add_rain(image, severity, **parameters)


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
  """One corruption of uint8 RGB [H, W, 3] (H, W >= 32) at severity 1-5, a function of `seed`.

  The library's corruptions draw from numpy's global generator: it is seeded with `seed` for
  this image only (under a lock, the caller's state restored after), and the two that take a
  seed of their own (impulse noise, glass blur) get it too. Returns uint8 [H, W, 3].
  Raises ValueError for an unknown corruption or severity, MissingExtraError without the extra.
  """
  if corruption not in CORRUPTIONS or severity not in SEVERITIES:
    raise ValueError(f"no corruption {corruption!r} at severity {severity!r}: choose one of "
                     f"{CORRUPTIONS} and 1..5")
  image = np.asarray(image, dtype=np.uint8)
  library = load_library()
  if corruption == "rain":
    return rain(image, severity, seed)
  options = {"seed": seed} if corruption in ("impulse_noise", "glass_blur") else {}
  with _GLOBAL_RANDOM_LOCK:
    state = np.random.get_state()
    try:
      np.random.seed(seed % 2**32)
      corrupted = library.corrupt(image, severity=severity, corruption_name=corruption,
                                  **options)
    finally:
      np.random.set_state(state)
  return np.asarray(corrupted, dtype=np.uint8).reshape(image.shape)


class CorruptedSource:
  """A prepared split whose visible images are corrupted on read (infrared ones unchanged).

  source: random-access records with 'image' uint8 [H, W, 3]; paths: str [N] relative paths
  (the per-image seed keys); modality: int [N] (0 visible). corruption: a name of CORRUPTIONS
  or "mixed"; severity: "1".."5" or "all" (drawn per image). Reads are thread-safe.
  """

  def __init__(self, source, paths: Sequence[str], modality: np.ndarray, *, corruption: str,
               severity: str, seed: int):
    load_library()  # Fails here, in one line, rather than in a reading thread.
    self._source = source
    self._paths = [str(path) for path in paths]
    self._modality = np.asarray(modality)
    self.corruption, self.severity, self.seed = corruption, str(severity), int(seed)

  def __len__(self) -> int:
    return len(self._source)

  def choice(self, index: int) -> tuple[str, int] | None:
    """(corruption, severity) applied to record `index`, None for an infrared image."""
    if self._modality[index] != VISIBLE_CODE:
      return None
    return draw_corruption(self.seed, self._paths[index], self.corruption, self.severity)

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    record = dict(self._source[int(index)])
    chosen = self.choice(int(index))
    if chosen is not None:
      name, level = chosen
      record["image"] = corrupt_image(record["image"], name, level,
                                      image_seed(self.seed, self._paths[int(index)]))
    return record
