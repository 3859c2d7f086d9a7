"""The benchmark's corruptions (dakd_jax/evaluation/corruptions.py): the library's output under
the image's seed, ImageNet-C's formulas worked in NumPy, the benchmark's rain against a NumPy
re-statement of its definition, and the per-image seeding (order, threads, global state)."""
import concurrent.futures
import importlib
import sys

import numpy as np
import pytest

from dakd_jax.errors import MissingExtraError
from dakd_jax.evaluation import corruptions

LIBRARY_CORRUPTIONS = corruptions.CORRUPTIONS[:-1]


def random_image(height=64, width=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("number", range(len(LIBRARY_CORRUPTIONS)))
def test_each_library_corruption_is_the_library_output_under_the_image_seed(number):
  imagecorruptions = importlib.import_module("imagecorruptions")  # the dev extra has it
  name, severity = LIBRARY_CORRUPTIONS[number], number % 5 + 1  # every severity covered
  image, seed = random_image(), 2**40 + 12345
  ours = corruptions.corrupt_image(image, name, severity, seed)
  np.random.seed(seed % 2**32)
  options = {"seed": seed} if name in ("impulse_noise", "glass_blur") else {}
  theirs = imagecorruptions.corrupt(image, severity=severity, corruption_name=name, **options)
  np.testing.assert_array_equal(ours, theirs)
  assert ours.dtype == np.uint8 and ours.shape == image.shape
  assert not np.array_equal(ours, image)  # the comparison is not of two untouched images


def test_gaussian_noise_and_contrast_follow_imagenet_c_formulas():
  image, seed = random_image(), 99
  # gaussian_noise, severity 2: clip(x/255 + N(0, 0.12), 0, 1) * 255, truncated to uint8.
  noise = np.random.RandomState(seed).normal(size=image.shape, scale=0.12)
  expected = (np.clip(image / 255.0 + noise, 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(corruptions.corrupt_image(image, "gaussian_noise", 2, seed),
                                expected)
  # contrast, severity 4: (x - per-channel mean) * 0.1 + mean, no randomness.
  x = image / 255.0
  means = x.mean(axis=(0, 1), keepdims=True)
  expected = (np.clip((x - means) * 0.1 + means, 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(corruptions.corrupt_image(image, "contrast", 4, 5), expected)


def test_the_caller_numpy_global_state_is_left_as_it_was():
  np.random.seed(7)
  before = np.random.get_state()[1].copy()
  corruptions.corrupt_image(random_image(), "shot_noise", 3, 1)
  np.testing.assert_array_equal(np.random.get_state()[1], before)
  np.random.seed(7)
  first = np.random.rand()
  np.random.seed(7)
  corruptions.corrupt_image(random_image(), "fog", 3, 1)
  assert np.random.rand() == first


def test_rain_parameters_follow_the_benchmark_counts_and_ranges():
  height, width = 96, 48
  for severity, (area_per_drop, length) in {1: (770, 10), 2: (600, 30), 3: (600, 30),
                                            4: (500, 60), 5: (500, 60)}.items():
    for seed in range(20):
      drawn = corruptions.rain_parameters(np.random.default_rng(seed), height, width, severity)
      slant, drops = drawn["slant"], drawn["drops"]
      assert drawn["drop_length"] == length and len(drops) == height * width // area_per_drop
      assert -10 < slant < 10
      low, high = (slant, width) if slant < 0 else (0, width - slant)
      assert drops[:, 0].min() >= low and drops[:, 0].max() <= high
      assert drops[:, 1].min() >= 0 and drops[:, 1].max() <= height - length
  with pytest.raises(ValueError, match="taller than 60"):
    corruptions.rain_parameters(np.random.default_rng(0), 60, 48, 5)


def box_blur_reflect101(image, size):
  """cv2.blur's definition: the mean over a size x size window (anchor at size // 2), borders
  reflected without repeating the edge pixel."""
  before = size // 2
  after = size - 1 - before
  padded = np.pad(image.astype(np.float64), ((before, after), (before, after), (0, 0)),
                  mode="reflect")
  out = np.zeros(image.shape, np.float64)
  for dy in range(size):
    for dx in range(size):
      out += padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]
  return out / size**2


@pytest.mark.parametrize("severity", [1, 4])
def test_rain_is_the_benchmark_definition_on_a_grey_image(severity):
  # Grey images pass the HLS round trip unchanged; a vertical drop (slant 0) is a column of 200s.
  grey = np.random.default_rng(severity).integers(0, 256, (64, 32), dtype=np.uint8)
  image = np.repeat(grey[:, :, None], 3, axis=2)
  length, drops = 10, np.array([[5, 3], [20, 40]])
  drawn = image.copy()
  for x, y in drops:
    drawn[y:y + length + 1, x] = 200  # the line's end points are both drawn
  blurred = box_blur_reflect101(drawn, 2 + severity)
  rounded = np.floor(blurred + 0.5)  # cv2 rounds the box mean to nearest
  shifted = np.clip(rounded - (0.05 + 0.05 * severity) * 255, 0, 255).astype(np.uint8)
  ours = corruptions.add_rain(image, severity, slant=0, drop_length=length, drops=drops)
  np.testing.assert_array_equal(ours, shifted)


def test_draw_corruption_is_uniform_per_image_and_fixed_values_pass_through():
  keys = [f"cam1/{i:04d}/0001.jpg" for i in range(4000)]
  drawn = [corruptions.draw_corruption(3, key, "mixed", "all") for key in keys]
  names = [name for name, _ in drawn]
  levels = np.array([level for _, level in drawn])
  counts = np.array([names.count(name) for name in corruptions.CORRUPTIONS])
  assert counts.min() > 0.6 * len(keys) / 20 and counts.max() < 1.4 * len(keys) / 20
  assert set(levels) == {1, 2, 3, 4, 5} and abs(levels.mean() - 3) < 0.1
  assert drawn == [corruptions.draw_corruption(3, key, "mixed", "all") for key in keys]
  assert drawn != [corruptions.draw_corruption(4, key, "mixed", "all") for key in keys]
  assert corruptions.draw_corruption(3, keys[0], "fog", "2") == ("fog", 2)
  assert {corruptions.draw_corruption(3, key, "mixed", "4")[1] for key in keys[:50]} == {4}


def test_corrupted_source_corrupts_visible_rows_only_the_same_in_any_order_or_thread():
  images = [random_image(seed=i) for i in range(6)]
  source = [{"image": image, "label": i} for i, image in enumerate(images)]
  paths = [f"cam{1 + i % 2}/0001/{i}.jpg" for i in range(6)]
  modality = np.array([0, 1, 0, 1, 0, 0])
  corrupted = corruptions.CorruptedSource(source, paths, modality, corruption="mixed",
                                          severity="all", seed=11)
  forward = [corrupted[i]["image"] for i in range(6)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    threaded = list(pool.map(lambda i: corrupted[i]["image"], reversed(range(6))))[::-1]
  for i in range(6):
    np.testing.assert_array_equal(forward[i], threaded[i])
    assert corrupted[i]["label"] == i
    if modality[i] == 1:
      np.testing.assert_array_equal(forward[i], images[i])
      assert corrupted.choice(i) is None
    else:
      name, level = corrupted.choice(i)
      expected = corruptions.corrupt_image(images[i], name, level,
                                           corruptions.image_seed(11, paths[i]))
      np.testing.assert_array_equal(forward[i], expected)
  assert len(corrupted) == 6


@pytest.mark.parametrize("missing", ["imagecorruptions", "cv2"])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, missing):
  monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
  with pytest.raises(MissingExtraError) as raised:
    corruptions.corrupt_image(random_image(), "fog", 1, 0)
  message = str(raised.value)
  assert "\n" not in message and "pip install -e '.[robustness]'" in message
  with pytest.raises(ValueError, match="no corruption 'smog'"):
    corruptions.corrupt_image(random_image(), "smog", 1, 0)
