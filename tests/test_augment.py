"""Tests for dakd_jax.augment: every op against a NumPy re-statement written here.

The re-statements derive the random numbers by calling jax.random with the key usage that each
function's docstring documents, then apply the op with plain NumPy (slices, loops), so a wrong
mask, offset, order or probability in the implementation shows up as a mismatch. Compilation
dominates the run time on a CPU, so each jitted op is built once (probabilities are traced).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax import augment
from dakd_jax.data import specs

H, W = 48, 24
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
FILL = np.array([0.4914, 0.4822, 0.4465], np.float32)
# Union over channels of the normalised range of [0, 1] inputs (channel ops move values across).
NORM_LOW = float(np.min(-MEAN / STD))
NORM_HIGH = float(np.max((1 - MEAN) / STD))


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _uint8_images(n, height=H, width=W, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _float_image(height=H, width=W, seed=0):
  return np.random.default_rng(seed).normal(size=(height, width, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _vmapped(op, n_traced, static):
  bound = functools.partial(op, **dict(static))
  return jax.jit(jax.vmap(bound, in_axes=(0, None) + (None,) * n_traced))


def _over_keys(op, keys, image, *traced, **static):
  """op(key, image, *traced, **static) for every key; one compiled function per op/static."""
  fn = _vmapped(op, len(traced), tuple(sorted(static.items())))
  return np.asarray(fn(keys, image, *traced))


# The key-taking forms of the ops: each draws its uniforms with jax.random.uniform, as the
# augmentation pipeline (`augment_batch`) draws them for a whole batch.
def random_geometric(key, image, settings):
  return augment.geometric_from_uniforms(jax.random.uniform(key, (3,)), image, settings)


def random_pad_crop(key, image, pad, pad_value):
  """Pad + random crop only: offsets as in `geometric_from_uniforms`, from two uniforms."""
  u = jax.random.uniform(key, (2,))
  return augment._pad_crop_at(image, pad, pad_value, augment.uniform_index(u[0], 2 * pad + 1),
                              augment.uniform_index(u[1], 2 * pad + 1))


def random_flip(key, image, prob):
  return jnp.where(jax.random.uniform(key, ()) < prob, image[:, ::-1], image)


def adaptive_gray(key, image):
  return augment.adaptive_gray_from_uniforms(jax.random.uniform(key, (2,)), image)


def random_erasing(key, image, prob):
  u = jax.random.uniform(key, (5 * augment.ERASING_ATTEMPTS,)).reshape(
      5, augment.ERASING_ATTEMPTS)
  return augment.erasing_from_uniforms(u, image, prob)


def _pad_crop_10(key, image, pad_value):
  return random_pad_crop(key, image, 10, pad_value)


# NumPy re-statements. Each op takes the uniforms its docstring names; the key-taking
# versions draw them with jax.random.uniform exactly as documented.

def np_index(u, n):
  """floor(u * float32(n)) capped at n - 1, in float32 like the implementation."""
  return int(min(np.floor(np.float32(u) * np.float32(n)), n - 1))


def np_normalize(image):
  return ((image.astype(np.float32) / np.float32(255)) - MEAN) / STD


def np_pad_crop_at(image, pad, pad_value, top, left):
  height, width, _ = image.shape
  padded = np.full((height + 2 * pad, width + 2 * pad, 3), pad_value, image.dtype)
  padded[pad:pad + height, pad:pad + width] = image
  return padded[top:top + height, left:left + width]


def np_pad_crop(key, image, pad, pad_value):
  u = np.asarray(jax.random.uniform(key, (2,)))
  return np_pad_crop_at(image, pad, pad_value, np_index(u[0], 2 * pad + 1),
                        np_index(u[1], 2 * pad + 1))


def np_flip(key, image, prob):
  return image[:, ::-1] if float(jax.random.uniform(key, ())) < prob else image


def np_geometric(u, image, settings):
  top, left = np_index(u[0], 2 * settings.pad + 1), np_index(u[1], 2 * settings.pad + 1)
  flip = u[2] < settings.flip_prob
  if settings.flip_before_pad and flip:
    image = image[:, ::-1]
  image = np_pad_crop_at(image, settings.pad, settings.pad_value, top, left)
  if not settings.flip_before_pad and flip:
    image = image[:, ::-1]
  return image


def np_replicate(image, channel):
  return np.repeat(image[:, :, channel:channel + 1], 3, axis=2)


def np_adaptive_gray(u, image):
  case = np_index(u[0], 4)
  if case < 3:
    return np_replicate(image, case)
  if not u[1] < 0.5:
    return image
  gray = (np.float32(0.2989) * image[..., 0] + np.float32(0.5870) * image[..., 1]
          + np.float32(0.1140) * image[..., 2])
  return np.repeat(gray[..., None], 3, axis=2)


def np_erasing_draw(u, height, width, prob):
  """The erasing rectangle (top, left, h, w, attempt) from u [5, 100], or None: image kept."""
  if not u[0, 0] < prob:
    return None
  area = (np.float32(0.02) + u[1] * np.float32(0.4 - 0.02)) * np.float32(height * width)
  aspect = np.float32(0.3) + u[2] * np.float32(1 / 0.3 - 0.3)
  for attempt in range(100):
    rect_h = int(np.round(np.sqrt(area[attempt] * aspect[attempt])))
    rect_w = int(np.round(np.sqrt(area[attempt] / aspect[attempt])))
    if rect_h < height and rect_w < width:
      top = np_index(u[3, attempt], height - rect_h + 1)
      left = np_index(u[4, attempt], width - rect_w + 1)
      return top, left, rect_h, rect_w, attempt
  return None


def np_erasing(u, image, prob):
  rect = np_erasing_draw(u, image.shape[0], image.shape[1], prob)
  out = image.copy()
  if rect is not None:
    top, left, rect_h, rect_w, _ = rect
    out[top:top + rect_h, left:left + rect_w] = FILL
  return out


def np_cutswap_draw(u, height, width, prob, fraction_range=(0.3, 0.6)):
  low, high = np.float32(fraction_range[0]), np.float32(fraction_range[1])
  fractions = np.minimum(low + u[1:3] * (high - low), np.nextafter(high, np.float32(0)))
  rect_h = int(np.floor(np.float32(height) * fractions[0]))
  rect_w = int(np.floor(np.float32(width) * fractions[1]))
  return dict(apply=u[0] < prob, rect_h=rect_h, rect_w=rect_w,
              top=np_index(u[3], height - rect_h + 1), left=np_index(u[4], width - rect_w + 1),
              channel=np_index(u[5], 3))


def np_cutswap(u, image, prob, fraction_range=(0.3, 0.6), mode="region"):
  draw = np_cutswap_draw(u, image.shape[0], image.shape[1], prob, fraction_range)
  if not draw["apply"]:
    return image
  exchanged = np_replicate(image, draw["channel"])
  if mode == "whole_image":
    return exchanged
  out = image.copy()
  rows = slice(draw["top"], draw["top"] + draw["rect_h"])
  cols = slice(draw["left"], draw["left"] + draw["rect_w"])
  out[rows, cols] = exchanged[rows, cols]
  return out


def np_augment_image(key, image, settings):
  u = np.asarray(jax.random.uniform(key, (512,)))
  x = np_normalize(np_geometric(u[0:3], image, settings))
  if settings.use_cutswap:
    x = np_cutswap(u[3:9], x, settings.cutswap_prob, settings.cutswap_range,
                   settings.cutswap_mode)
  x = np_erasing(u[9:509].reshape(5, 100), x, settings.erasing_prob)
  if settings.use_adaptive_gray:
    x = np_adaptive_gray(u[509:511], x)
  if settings.use_channel_exchange:
    x = np_replicate(x, np_index(u[511], 3))
  return x


def uniforms(key, shape):
  return np.asarray(jax.random.uniform(key, shape))


def erasing_uniforms(key):
  return uniforms(key, (500,)).reshape(5, 100)


# Normalisation.

def test_normalize_hand_values_and_round_trip():
  images = np.zeros((2, 3, 4, 3), np.uint8)
  images[1] = 255
  out = np.asarray(augment.normalize(jnp.asarray(images)))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
                             rtol=1e-6)
  np.testing.assert_allclose(out[1, 2, 3], [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225],
                             rtol=1e-6)
  random = _uint8_images(2)
  normalised = augment.normalize(jnp.asarray(random))
  np.testing.assert_allclose(np.asarray(normalised), np_normalize(random), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(augment.denormalize(normalised)), random)


# Geometric ops.

@pytest.mark.parametrize("pad_value", [0, 127])
def test_pad_crop_matches_numpy(pad_value):
  image = _uint8_images(1)[0]
  keys = _keys(24, seed=pad_value)
  out = _over_keys(_pad_crop_10, keys, image, pad_value)
  assert out.dtype == np.uint8
  for key, got in zip(keys, out):
    np.testing.assert_array_equal(got, np_pad_crop(key, image, 10, pad_value))
  # Some offsets expose the pad as whole border rows of the pad value.
  assert np.any(np.all(out[:, 0] == pad_value, axis=(1, 2)))


def test_crop_offsets_uniform_over_all_positions():
  rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  image = np.stack([rows + 1, cols + 1, np.full_like(rows, 99)], -1).astype(np.uint8)
  out = _over_keys(_pad_crop_10, _keys(20000), image, 0)
  # Output (24, 12) shows original (24 + top - 10, 12 + left - 10), always inside the image.
  top = out[:, 24, 12, 0].astype(int) - 1 - 24 + 10
  left = out[:, 24, 12, 1].astype(int) - 1 - 12 + 10
  counts = np.zeros((21, 21), int)
  np.add.at(counts, (top, left), 1)
  assert counts.min() > 0  # every one of the 21 x 21 positions occurs (expected 45 each)
  for marginal in (counts.sum(0), counts.sum(1)):
    assert np.all(np.abs(marginal / 20000 - 1 / 21) < 0.15 / 21), marginal


def test_flip_matches_numpy_and_edge_probabilities():
  image = _uint8_images(1)[0]
  keys = _keys(16, seed=3)
  out = _over_keys(random_flip, keys, image, 0.5)
  for key, got in zip(keys, out):
    np.testing.assert_array_equal(got, np_flip(key, image, 0.5))
  never = _over_keys(random_flip, keys, image, 0.0)
  always = _over_keys(random_flip, keys, image, 1.0)
  np.testing.assert_array_equal(never, np.broadcast_to(image, never.shape))
  np.testing.assert_array_equal(always, np.broadcast_to(image[:, ::-1], always.shape))


def test_flip_rate_matches_probability():
  image = _uint8_images(1)[0]
  out = _over_keys(random_flip, _keys(4000, seed=1), image, 0.3)
  flipped = np.all(out == image[:, ::-1], axis=(1, 2, 3))
  assert abs(flipped.mean() - 0.3) < 0.03


@pytest.mark.parametrize("flip_before_pad", [False, True])
def test_geometric_order_matches_numpy(flip_before_pad):
  settings = augment.AugmentSettings(pad_value=127, flip_before_pad=flip_before_pad)
  image = _uint8_images(1)[0]
  keys = _keys(24, seed=5)
  out = _over_keys(random_geometric, keys, image, settings=settings)
  for key, got in zip(keys, out):
    np.testing.assert_array_equal(got, np_geometric(uniforms(key, (3,)), image, settings))
  other = augment.AugmentSettings(pad_value=127, flip_before_pad=not flip_before_pad)
  reordered = np.stack([np_geometric(uniforms(key, (3,)), image, other) for key in keys])
  assert np.any(reordered != out)  # same draws, other order: the field must matter


# Channel ops.

def test_channel_exchange_matches_numpy_and_frequencies():
  image = _float_image()
  keys = _keys(1500, seed=7)
  out = _over_keys(augment.channel_exchange, keys, image)
  for key, got in zip(keys[:16], out[:16]):
    np.testing.assert_array_equal(got, np_replicate(image, np_index(uniforms(key, ()), 3)))
  chosen = np.stack([np.all(out == np_replicate(image, c), axis=(1, 2, 3)) for c in range(3)])
  assert np.all(chosen.sum(0) == 1)
  np.testing.assert_allclose(chosen.mean(1), [1 / 3] * 3, atol=0.05)


def test_channel_exchange_batch_matches_numpy():
  images = np.stack([_float_image(seed=s) for s in range(5)])
  key = jax.random.key(11)
  out = np.asarray(jax.jit(augment.channel_exchange_batch)(key, jnp.asarray(images)))
  for sample_key, image, got in zip(jax.random.split(key, 5), images, out):
    np.testing.assert_array_equal(got, np_replicate(image, np_index(uniforms(sample_key, ()), 3)))
  with pytest.raises(ValueError, match=r"\[n, H, W, 3\]"):
    augment.channel_exchange_batch(key, jnp.asarray(images[0]))


def test_adaptive_gray_matches_numpy_and_case_frequencies():
  image = _float_image(seed=2)
  keys = _keys(2000, seed=8)
  out = _over_keys(adaptive_gray, keys, image)
  for key, got in zip(keys[:24], out[:24]):
    np.testing.assert_allclose(got, np_adaptive_gray(uniforms(key, (2,)), image), atol=1e-6)
  gray = (0.2989 * image[..., 0] + 0.5870 * image[..., 1] + 0.1140 * image[..., 2])
  cases = [np.repeat(image[..., c:c + 1], 3, 2) for c in range(3)]
  cases += [np.repeat(gray[..., None], 3, 2), image]
  hits = np.stack([np.all(np.abs(out - c) < 1e-5, axis=(1, 2, 3)) for c in cases])
  assert np.all(hits.sum(0) == 1)
  np.testing.assert_allclose(hits.mean(1), [0.25, 0.25, 0.25, 0.125, 0.125], atol=0.035)


# Random erasing.

def test_random_erasing_matches_numpy_and_rectangle_inside():
  image = _float_image(seed=4)
  keys = _keys(64, seed=9)
  out = _over_keys(random_erasing, keys, image, 0.5)
  erased = 0
  for key, got in zip(keys, out):
    np.testing.assert_array_equal(got, np_erasing(erasing_uniforms(key), image, 0.5))
    changed = np.any(got != image, axis=-1)
    if changed.any():
      erased += 1
      rows, cols = np.nonzero(changed)
      box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
      assert changed[box].all()  # exactly one filled rectangle, smaller than the image
      assert rows.max() - rows.min() + 1 < H and cols.max() - cols.min() + 1 < W
      np.testing.assert_array_equal(got[box], np.broadcast_to(FILL, got[box].shape))
  assert 16 < erased < 48


def test_random_erasing_first_fitting_attempt_and_no_fit():
  # 8 x 4: many candidates are too wide, so later attempts get used.
  image = _float_image(8, 4, seed=1)
  keys = _keys(64, seed=12)
  out = _over_keys(random_erasing, keys, image, 1.0)
  attempts = []
  for key, got in zip(keys, out):
    np.testing.assert_array_equal(got, np_erasing(erasing_uniforms(key), image, 1.0))
    attempts.append(np_erasing_draw(erasing_uniforms(key), 8, 4, 1.0)[4])
  assert max(attempts) > 0
  # 1 x 100: h < 1 needs area * aspect < 0.25 with area >= 2, so nothing fits: image kept.
  thin = _float_image(1, 100)
  kept = _over_keys(random_erasing, keys[:8], thin, 1.0)
  np.testing.assert_array_equal(kept, np.broadcast_to(thin, kept.shape))


def test_random_erasing_edge_probabilities():
  image = _float_image(seed=6)
  keys = _keys(32, seed=13)
  never = _over_keys(random_erasing, keys, image, 0.0)
  np.testing.assert_array_equal(never, np.broadcast_to(image, never.shape))
  always = _over_keys(random_erasing, keys, image, 1.0)
  assert np.all(np.any(always != image, axis=(1, 2, 3)))


# CutSwap.

@pytest.mark.parametrize("mode", ["region", "whole_image"])
def test_cutswap_matches_numpy_and_edge_probabilities(mode):
  # Channels differ everywhere, so any exchange changes two channels of every pixel it covers.
  image = _float_image(seed=10) + np.array([0.0, 10.0, 20.0], np.float32)
  keys = _keys(48, seed=14)
  out = _over_keys(augment.cutswap, keys, image, 0.5, mode=mode)
  for key, got in zip(keys, out):
    np.testing.assert_array_equal(got, np_cutswap(uniforms(key, (6,)), image, 0.5, (0.3, 0.6),
                                                  mode))
    draw = np_cutswap_draw(uniforms(key, (6,)), H, W, 0.5)
    assert 0 <= draw["top"] <= H - draw["rect_h"] and 0 <= draw["left"] <= W - draw["rect_w"]
    assert 14 <= draw["rect_h"] <= 28 and 7 <= draw["rect_w"] <= 14  # floor(48 f), floor(24 f)
  never = _over_keys(augment.cutswap, keys, image, 0.0, mode=mode)
  np.testing.assert_array_equal(never, np.broadcast_to(image, never.shape))
  changed = np.any(_over_keys(augment.cutswap, keys, image, 1.0, mode=mode) != image, axis=-1)
  if mode == "whole_image":
    assert changed.all()
  else:
    fraction = changed.mean(axis=(1, 2))
    assert np.all(fraction >= (14 * 7) / (H * W)) and np.all(fraction <= (28 * 14) / (H * W))


def test_cutswap_region_statistics():
  image = _float_image(seed=17) + np.array([0.0, 10.0, 20.0], np.float32)
  out = _over_keys(augment.cutswap, _keys(2000, seed=18), image, 0.5, mode="region")
  changed = np.any(out != image, axis=-1)
  applied = changed.any(axis=(1, 2))
  assert abs(applied.mean() - 0.5) < 0.04
  heights, widths, tops, lefts = [], [], [], []
  for mask in changed[applied]:
    rows, cols = np.nonzero(mask)
    heights.append(rows.max() - rows.min() + 1)
    widths.append(cols.max() - cols.min() + 1)
    tops.append(rows.min())
    lefts.append(cols.min())
    assert mask.sum() == heights[-1] * widths[-1]  # a full rectangle
  heights, widths, tops = np.array(heights), np.array(widths), np.array(tops)
  # ch = floor(48 f), f uniform in [0.3, 0.6): ch in [14, 28], mean about 48 * 0.45 - 0.5.
  assert heights.min() == 14 and heights.max() == 28
  assert widths.min() == 7 and widths.max() == 14
  assert abs(heights.mean() - (48 * 0.45 - 0.5)) < 0.7
  assert np.all(tops + heights <= H) and np.all(np.array(lefts) + widths <= W)
  assert tops.min() == 0 and np.any(tops + heights == H)


# Full pipeline per view.

VIEW_CASES = [(d, v, "region") for d in ("sysu_mm01", "regdb") for v in augment.VIEWS
              if (d, v) != ("regdb", "channel")]  # regdb channel == sysu channel (tested below)
VIEW_CASES.append(("sysu_mm01", "visible", "whole_image"))


def recipe(dataset):
  return specs.get_spec(dataset).augment


@pytest.mark.parametrize("dataset,view,mode", VIEW_CASES)
def test_augment_batch_matches_numpy_for_every_view(dataset, view, mode):
  settings = augment.view_settings(view, recipe(dataset), cutswap_mode=mode)
  images = _uint8_images(6, seed=20)
  key = jax.random.key(21)
  out = np.asarray(jax.jit(augment.augment_batch, static_argnames="settings")(
      key, jnp.asarray(images), settings))
  assert out.shape == images.shape and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  assert out.min() >= NORM_LOW - 1e-5 and out.max() <= NORM_HIGH + 1e-5
  for sample_key, image, got in zip(jax.random.split(key, 6), images, out):
    np.testing.assert_allclose(got, np_augment_image(sample_key, image, settings),
                               rtol=0, atol=1e-5)


def test_view_settings_follow_the_table():
  get = lambda dataset, view, **knobs: augment.view_settings(view, recipe(dataset), **knobs)
  sysu_v, sysu_i, sysu_a = (get("sysu_mm01", v) for v in augment.VIEWS)
  regdb_v, regdb_i, regdb_a = (get("regdb", v) for v in augment.VIEWS)
  # LLCM follows the SYSU-MM01 recipe (llcm.md 4).
  assert [get("llcm", v) for v in augment.VIEWS] == [sysu_v, sysu_i, sysu_a]
  flags = lambda s: (s.use_cutswap, s.use_adaptive_gray, s.use_channel_exchange)
  assert flags(sysu_v) == (True, False, False)
  assert flags(sysu_i) == (False, True, False)
  assert flags(sysu_a) == (False, False, True)
  for s in (regdb_v, regdb_i):
    assert (s.pad_value, s.flip_before_pad) + flags(s) == (127, True, False, False, False)
  assert regdb_a == sysu_a  # channel view: zero padding on both datasets
  for s in (sysu_v, sysu_i, sysu_a):
    assert (s.pad, s.pad_value, s.flip_before_pad, s.flip_prob, s.erasing_prob) == (
        10, 0, False, 0.5, 0.5)
  assert (regdb_v.pad, regdb_v.flip_prob, regdb_v.erasing_prob) == (10, 0.5, 0.5)
  assert not get("sysu_mm01", "visible", use_cutswap_on_visible=False).use_cutswap
  released = get("sysu_mm01", "visible", cutswap_mode="whole_image", cutswap_range=[0.2, 0.5])
  assert released.cutswap_mode == "whole_image" and released.cutswap_range == (0.2, 0.5)
  with pytest.raises(ValueError, match="thermal"):
    get("regdb", "thermal")


def test_settings_validation_names_the_field():
  for field, value in [("pad", -1), ("pad_value", 300), ("flip_prob", 1.5),
                       ("erasing_prob", -0.1), ("cutswap_range", (0.6, 0.3)),
                       ("cutswap_mode", "patch")]:
    with pytest.raises(ValueError, match=field):
      augment.AugmentSettings(**{field: value})
  with pytest.raises(ValueError, match="uint8"):
    augment.augment_batch(jax.random.key(0), jnp.zeros((2, H, W, 3)), augment.AugmentSettings())
  with pytest.raises(ValueError, match=r"\[n, H, W, 3\]"):
    augment.augment_batch(jax.random.key(0), jnp.zeros((2, H, W, 1), jnp.uint8),
                          augment.AugmentSettings())


def test_jitted_augment_batch_compiles_once():
  settings = augment.view_settings("infrared", recipe("sysu_mm01"))
  traces = []

  def counted(key, images):
    traces.append(1)  # runs only while tracing
    return augment.augment_batch(key, images, settings)

  counted_jit = jax.jit(counted)
  static_jit = jax.jit(augment.augment_batch, static_argnames="settings")
  outputs, cache_sizes = [], []
  for seed in range(3):
    # Shape shared with the view tests; explicit transfers only, as inside the training loop.
    images, key = jax.device_put((_uint8_images(6, seed=seed), jax.random.key(seed)))
    with jax.transfer_guard("disallow"):
      outputs.append(jax.device_get(counted_jit(key, images)))
      # A fresh but equal settings object must hit the same cache entry.
      fresh = augment.view_settings("infrared", recipe("sysu_mm01"), cutswap_range=[0.3, 0.6])
      np.testing.assert_array_equal(jax.device_get(static_jit(key, images, fresh)),
                                    outputs[-1])
    cache_sizes.append(static_jit._cache_size())  # the cache is shared by jits of one function
  assert len(traces) == 1
  assert cache_sizes[0] == cache_sizes[-1]
  assert not np.array_equal(outputs[0], outputs[1])
