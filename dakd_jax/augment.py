"""Batched training augmentations that run on the device, inside the compiled step.

Data flow: Grain delivers uint8 batches `[n, H, W, 3]` to the host; the compiled training step
calls `augment_batch` once per view (method.md 5.2) and feeds the float32 result to the network.
Memory building (method.md 3.2) uses `normalize` and `channel_exchange_batch` only.

Every random op is a pure function of uniform numbers in [0, 1) and one image
(`*_from_uniforms`), with a wrapper taking `(key, image, ...)` that draws them in one
`jax.random.uniform` call. A whole pipeline draws all of an image's numbers in one call too:
each random-number site adds about a second of XLA:CPU compilation, so few sites compile fast. Batches are `jax.vmap` over one key per sample. Shapes are static: rectangles of drawn
size are applied with masks built from iota comparisons. Which number drives which decision is
written in each docstring, so a test can re-derive the draws and re-state the op in NumPy.
"""
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dakd_jax.errors import Bounds, SettingError, check_bounds

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Random erasing constants (method.md 5.2); the fill is written in normalised space.
ERASING_FILL = (0.4914, 0.4822, 0.4465)
ERASING_ATTEMPTS = 100
ERASING_AREA = (0.02, 0.4)
ERASING_ASPECT = (0.3, 1.0 / 0.3)
LUMINANCE_WEIGHTS = (0.2989, 0.5870, 0.1140)
VIEWS = ("visible", "infrared", "channel")
CUTSWAP_MODES = ("region", "whole_image")
# Slices of the per-image uniform vector drawn by `augment_image`.
GEOMETRIC_SLOTS = slice(0, 3)
CUTSWAP_SLOTS = slice(3, 9)
ERASING_SLOTS = slice(9, 9 + 5 * ERASING_ATTEMPTS)
GRAY_SLOTS = slice(509, 511)
CHANNEL_SLOT = 511
UNIFORMS_PER_IMAGE = 512


def normalize(images):
  """Scales uint8 pixels to [0, 1] and normalises with the ImageNet mean and std.

  Args:
    images: `[..., H, W, 3]` uint8 (any leading dims).
  Returns:
    float32 array of the same shape: `(images / 255 - mean) / std` per channel.
  """
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def denormalize(images):
  """Inverse of `normalize` for display: float32 `[..., 3]` -> uint8, clipped to [0, 255]."""
  x = images * jnp.asarray(IMAGENET_STD, jnp.float32) + jnp.asarray(IMAGENET_MEAN, jnp.float32)
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def uniform_index(u, n):
  """`floor(u * float32(n))` capped at `n - 1`: an int32 uniform in [0, n) from u in [0, 1)."""
  n = jnp.asarray(n, jnp.int32)
  return jnp.minimum(jnp.floor(u * n.astype(jnp.float32)).astype(jnp.int32), n - 1)


def _pad_crop_at(image, pad, pad_value, top, left):
  height, width, channels = image.shape
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)),
                   constant_values=jnp.asarray(pad_value, image.dtype))
  return jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))


def geometric_from_uniforms(u, image, settings):
  """Pad + random crop and horizontal flip, in the order `settings.flip_before_pad` says.

  Padding adds `settings.pad` pixels of `settings.pad_value` on every side; the crop takes
  `padded[top:top + H, left:left + W]` with `top = uniform_index(u[0], 2 pad + 1)`,
  `left = uniform_index(u[1], 2 pad + 1)` (uniform over all (2 pad + 1)^2 offsets); the image is
  mirrored left-right when `u[2] < settings.flip_prob`.

  Args:
    u: `[3]` float32 uniforms in [0, 1).
    image: `[H, W, C]`, any dtype; for the pipeline uint8 before normalisation, so the pad
      value is a pixel value (0 black, 127 grey).
    settings: `AugmentSettings` (uses pad, pad_value, flip_prob, flip_before_pad).
  Returns:
    `[H, W, C]` of the input dtype.
  """
  positions = 2 * settings.pad + 1
  top, left = uniform_index(u[0], positions), uniform_index(u[1], positions)
  flip = u[2] < settings.flip_prob
  if settings.flip_before_pad:
    image = jnp.where(flip, image[:, ::-1], image)
  image = _pad_crop_at(image, settings.pad, settings.pad_value, top, left)
  if not settings.flip_before_pad:
    image = jnp.where(flip, image[:, ::-1], image)
  return image


def replicate_channel(image, channel):
  """Copies channel `channel` (traced int in {0, 1, 2}) of `[H, W, 3]` into all three channels."""
  # A select chain, not a dot with a one-hot: exact, and no reduced-precision matmul on GPUs.
  picked = jnp.where(channel == 0, image[..., 0],
                     jnp.where(channel == 1, image[..., 1], image[..., 2]))
  return jnp.broadcast_to(picked[..., None], image.shape)


def channel_exchange(key, image):
  """Replicates one colour channel, chosen uniformly, into all channels (method.md 5.2).

  `channel = uniform_index(jax.random.uniform(key, ()), 3)`; `image` is `[H, W, 3]` float32.
  """
  return replicate_channel(image, uniform_index(jax.random.uniform(key, ()), 3))


def adaptive_gray_from_uniforms(u, image):
  """Infrared-view channel op: R, G or B replicated (1/4 each), else luminance with p 1/2.

  `case = uniform_index(u[0], 4)`; case 0/1/2 copies that channel into all channels; case 3
  gives `0.2989 R + 0.5870 G + 0.1140 B` in all channels if `u[1] < 0.5`, else the image.

  Args:
    u: `[2]` float32 uniforms in [0, 1).
    image: `[H, W, 3]` float32 (normalised).
  Returns:
    `[H, W, 3]` float32.
  """
  case = uniform_index(u[0], 4)
  weights = LUMINANCE_WEIGHTS
  luminance = (weights[0] * image[..., 0] + weights[1] * image[..., 1]
               + weights[2] * image[..., 2])
  fourth = jnp.where(u[1] < 0.5, jnp.broadcast_to(luminance[..., None], image.shape), image)
  return jnp.where(case < 3, replicate_channel(image, case), fourth)


def _rectangle_mask(shape, top, left, height, width):
  """Boolean `[H, W]` mask of rows `[top, top+height)` x cols `[left, left+width)` (traced)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)


def erasing_from_uniforms(u, image, prob):
  """Random erasing with up to 100 attempts (method.md 5.2), with static shapes.

  All 100 candidates are computed at once and the first that fits is used, which is what a loop
  stopping at the first fit does. In float32: `area = (0.02 + u[1] * (0.4 - 0.02)) * (H * W)`,
  `aspect = 0.3 + u[2] * (1 / 0.3 - 0.3)`, `h = round(sqrt(area * aspect))`,
  `w = round(sqrt(area / aspect))` (half to even), `fits = (h < H) & (w < W)`,
  `top = uniform_index(u[3], H - h + 1)`, `left = uniform_index(u[4], W - w + 1)` (ranges
  clipped to >= 1 for candidates that do not fit). With `i` the first fitting attempt, rows
  `[top_i, top_i + h_i)` x cols `[left_i, left_i + w_i)` are set to `ERASING_FILL` per channel,
  if `u[0, 0] < prob`. No fit: the image is unchanged.

  Args:
    u: `[5, 100]` float32 uniforms in [0, 1).
    image: `[H, W, 3]` float32 (normalised).
    prob: probability of erasing, in [0, 1] (may be traced).
  Returns:
    `[H, W, 3]` float32.
  """
  height, width, _ = image.shape
  area = (ERASING_AREA[0] + u[1] * (ERASING_AREA[1] - ERASING_AREA[0])) * (height * width)
  aspect = ERASING_ASPECT[0] + u[2] * (ERASING_ASPECT[1] - ERASING_ASPECT[0])
  rect_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  rect_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (rect_h < height) & (rect_w < width)
  top = uniform_index(u[3], jnp.maximum(height - rect_h + 1, 1))
  left = uniform_index(u[4], jnp.maximum(width - rect_w + 1, 1))
  first = jnp.argmax(fits)  # index of the first True; 0 when none fits (then unused)
  mask = _rectangle_mask((height, width), top[first], left[first], rect_h[first], rect_w[first])
  mask = mask & (u[0, 0] < prob) & jnp.any(fits)
  return jnp.where(mask[..., None], jnp.asarray(ERASING_FILL, image.dtype), image)


def cutswap_from_uniforms(u, image, prob, fraction_range=(0.3, 0.6), mode="region"):
  """CutSwap (method.md 5.2): a rectangle (or, released, the whole image) channel-exchanged.

  In float32 with `(lo, hi) = fraction_range`: `fh = lo + u[1] * (hi - lo)`,
  `fw = lo + u[2] * (hi - lo)`, each capped at the float32 just below `hi` (half-open range);
  `ch = floor(H * fh)`, `cw = floor(W * fw)`; `top = uniform_index(u[3], H - ch + 1)`,
  `left = uniform_index(u[4], W - cw + 1)`; the exchanged image replicates channel
  `uniform_index(u[5], 3)`. Applied when `u[0] < prob`. Mode "region": rows `[top, top+ch)` x
  cols `[left, left+cw)` take the exchanged pixels. Mode "whole_image" (released code,
  method.md 5.2 [variant], config `augment.cutswap_mode`): the whole image is exchanged.

  Args:
    u: `[6]` float32 uniforms in [0, 1).
    image: `[H, W, 3]` float32 (normalised).
    prob: probability of applying, in [0, 1] (may be traced).
    fraction_range: static `(lo, hi)` with 0 <= lo < hi <= 1.
    mode: static, "region" or "whole_image".
  Returns:
    `[H, W, 3]` float32.
  Raises:
    ValueError: unknown `mode`.
  """
  if mode not in CUTSWAP_MODES:
    raise ValueError(f"cutswap mode {mode!r} is not one of {CUTSWAP_MODES}.")
  height, width, _ = image.shape
  low, high = np.float32(fraction_range[0]), np.float32(fraction_range[1])
  fractions = jnp.minimum(low + u[1:3] * (high - low), np.nextafter(high, np.float32(-1)))
  rect_h = jnp.floor(np.float32(height) * fractions[0]).astype(jnp.int32)
  rect_w = jnp.floor(np.float32(width) * fractions[1]).astype(jnp.int32)
  top = uniform_index(u[3], height - rect_h + 1)
  left = uniform_index(u[4], width - rect_w + 1)
  exchanged = replicate_channel(image, uniform_index(u[5], 3))
  apply = u[0] < prob
  if mode == "whole_image":
    return jnp.where(apply, exchanged, image)
  mask = _rectangle_mask((height, width), top, left, rect_h, rect_w) & apply
  return jnp.where(mask[..., None], exchanged, image)


def cutswap(key, image, prob, fraction_range=(0.3, 0.6), mode="region"):
  """`cutswap_from_uniforms(jax.random.uniform(key, (6,)), image, prob, fraction_range, mode)`."""
  return cutswap_from_uniforms(jax.random.uniform(key, (6,)), image, prob, fraction_range, mode)


PROBABILITY = Bounds(0.0, 1.0)
AUGMENT_BOUNDS = {"pad": Bounds(0), "pad_value": Bounds(0, 255),  # a uint8 pixel value
                  "flip_prob": PROBABILITY, "erasing_prob": PROBABILITY,
                  "cutswap_prob": PROBABILITY}
CUTSWAP_FRACTION = Bounds(0.0, 1.0, low_inclusive=False)  # of the image height or width


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """Static description of one view's augmentation pipeline (hashable: a jit static argument).

  The pipeline order is fixed (method.md 5.2): geometric (pad/crop and flip, in the order
  `flip_before_pad` says) on uint8, normalise, CutSwap, random erasing, adaptive gray, channel
  exchange; each of the last four is switched by its field.

  Attributes:
    pad: pixels padded on every side before the random crop.
    pad_value: uint8 pad value: 0 (black, SYSU-MM01) or 127 (grey, RegDB).
    flip_prob: horizontal flip probability.
    flip_before_pad: True flips, then pads and crops (RegDB); False pads, crops, flips (SYSU).
    erasing_prob: random erasing probability (0 disables it).
    use_cutswap: apply CutSwap.
    cutswap_prob: CutSwap probability.
    cutswap_range: `(lo, hi)` for the height and width fractions, uniform in [lo, hi).
    cutswap_mode: "region" (intended) or "whole_image" (released; config `augment.cutswap_mode`).
    use_adaptive_gray: apply adaptive gray (SYSU-MM01 infrared view).
    use_channel_exchange: apply channel exchange (channel-augmented view `a`).
  """
  pad: int = 10
  pad_value: int = 0
  flip_prob: float = 0.5
  flip_before_pad: bool = False
  erasing_prob: float = 0.5
  use_cutswap: bool = False
  cutswap_prob: float = 0.5
  cutswap_range: Tuple[float, float] = (0.3, 0.6)
  cutswap_mode: str = "region"
  use_adaptive_gray: bool = False
  use_channel_exchange: bool = False

  def __post_init__(self):
    # A list would make the settings unhashable and so unusable as a static jit argument.
    object.__setattr__(self, "cutswap_range", tuple(float(v) for v in self.cutswap_range))
    # The one declaration of these bounds: start-up builds the settings and names the config
    # field of a refused value (builders.augment_views).
    if isinstance(self.pad, bool) or not isinstance(self.pad, int):
      raise SettingError("AugmentSettings", "pad", self.pad, "an integer >= 0")
    for name, bounds in AUGMENT_BOUNDS.items():
      check_bounds("AugmentSettings", name, getattr(self, name), bounds)
    if len(self.cutswap_range) != 2:
      raise SettingError("AugmentSettings", "cutswap_range", self.cutswap_range, "(lo, hi)")
    for index, fraction in enumerate(self.cutswap_range):
      check_bounds("AugmentSettings", f"cutswap_range[{index}]", fraction, CUTSWAP_FRACTION)
    if self.cutswap_range[0] >= self.cutswap_range[1]:
      raise SettingError("AugmentSettings", "cutswap_range", self.cutswap_range,
                         "(lo, hi) with lo < hi")
    if self.cutswap_mode not in CUTSWAP_MODES:
      raise SettingError("AugmentSettings", "cutswap_mode", self.cutswap_mode,
                         f"one of {CUTSWAP_MODES}")


def view_settings(view, recipe, *, cutswap_mode="region", cutswap_prob=0.5,
                  cutswap_range=(0.3, 0.6), use_cutswap_on_visible=True):
  """The settings of one view, following the table in method.md 5.2.

  | view     | SYSU-MM01 recipe                           | RegDB recipe                     |
  |----------|--------------------------------------------|----------------------------------|
  | visible  | zero pad/crop/flip, CutSwap, erasing       | flip/grey pad/crop, erasing      |
  | infrared | zero pad/crop/flip, erasing, adaptive gray | flip/grey pad/crop, erasing      |
  | channel  | zero pad/crop/flip, erasing, channel exch. | same as SYSU-MM01                |

  Args:
    view: "visible", "infrared" or "channel".
    recipe: the dataset's `specs.AugmentRecipe` (grey_pad_flip_first, cutswap_on_visible,
      adaptive_gray_on_infrared).
    cutswap_mode, cutswap_prob, cutswap_range: CutSwap knobs (`augment.*`, method.md 10).
    use_cutswap_on_visible: CutSwap on the visible view where the recipe has it (the teacher may
      turn it off, config `teacher.cutswap`); a recipe without CutSwap (RegDB) never uses it.
  Returns:
    `AugmentSettings`.
  Raises:
    ValueError: unknown view, or invalid CutSwap knobs.
  """
  if view not in VIEWS:
    raise ValueError(f"view {view!r} is not one of {VIEWS}.")
  grey_first = recipe.grey_pad_flip_first and view != "channel"
  return AugmentSettings(
      pad=10,
      pad_value=127 if grey_first else 0,
      flip_prob=0.5,
      flip_before_pad=grey_first,
      erasing_prob=0.5,
      use_cutswap=(recipe.cutswap_on_visible and view == "visible" and use_cutswap_on_visible),
      cutswap_prob=cutswap_prob,
      cutswap_range=tuple(cutswap_range),
      cutswap_mode=cutswap_mode,
      use_adaptive_gray=(recipe.adaptive_gray_on_infrared and view == "infrared"),
      use_channel_exchange=(view == "channel"),
  )


def augment_image(key, image, settings):
  """The full pipeline of one view for one image (order: method.md 5.2).

  Draws `u = jax.random.uniform(key, (512,))` once and applies, each only if switched on:
  `geometric_from_uniforms(u[0:3])` on uint8, `normalize`, `cutswap_from_uniforms(u[3:9])`,
  `erasing_from_uniforms(u[9:509].reshape(5, 100))`, `adaptive_gray_from_uniforms(u[509:511])`,
  channel exchange with `uniform_index(u[511], 3)`.

  Args:
    key: PRNG key.
    image: `[H, W, 3]` uint8.
    settings: `AugmentSettings` (static).
  Returns:
    `[H, W, 3]` float32, normalised.
  """
  u = jax.random.uniform(key, (UNIFORMS_PER_IMAGE,))
  x = normalize(geometric_from_uniforms(u[GEOMETRIC_SLOTS], image, settings))
  if settings.use_cutswap:
    x = cutswap_from_uniforms(u[CUTSWAP_SLOTS], x, settings.cutswap_prob,
                              settings.cutswap_range, settings.cutswap_mode)
  if settings.erasing_prob > 0:
    x = erasing_from_uniforms(u[ERASING_SLOTS].reshape(5, ERASING_ATTEMPTS), x,
                              settings.erasing_prob)
  if settings.use_adaptive_gray:
    x = adaptive_gray_from_uniforms(u[GRAY_SLOTS], x)
  if settings.use_channel_exchange:
    x = replicate_channel(x, uniform_index(u[CHANNEL_SLOT], 3))
  return x


def _check_batch(images, name, dtype):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name}: expected [n, H, W, 3], got shape {tuple(images.shape)}.")
  if dtype is not None and images.dtype != dtype:
    raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {images.dtype}; "
                     "pass the raw uint8 batch (normalisation happens here).")


def augment_batch(key, images, settings):
  """Augments a batch on the device: one view's pipeline, independent randomness per sample.

  `keys = jax.random.split(key, n)`; sample `j` is `augment_image(keys[j], images[j],
  settings)`. Jit with `settings` static (`jax.jit(augment_batch, static_argnames="settings")`);
  equal settings objects hit the same compiled function.

  Args:
    key: PRNG key.
    images: `[n, H, W, 3]` uint8.
    settings: `AugmentSettings`.
  Returns:
    `[n, H, W, 3]` float32, normalised.
  Raises:
    ValueError: wrong rank, channel count or dtype.
  """
  _check_batch(images, "augment_batch images", jnp.uint8)
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(augment_image, in_axes=(0, 0, None))(keys, images, settings)


def channel_exchange_batch(key, images):
  """Channel exchange per sample, for building the memory `M_a` (method.md 3.2).

  `keys = jax.random.split(key, n)`; sample `j` is `channel_exchange(keys[j], images[j])`.

  Args:
    key: PRNG key.
    images: `[n, H, W, 3]` float32, already normalised.
  Returns:
    `[n, H, W, 3]` float32.
  Raises:
    ValueError: wrong rank or channel count.
  """
  _check_batch(images, "channel_exchange_batch images", None)
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(channel_exchange)(keys, images)
