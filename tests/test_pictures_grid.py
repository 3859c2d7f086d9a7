"""The augmentation grid (dakd_jax.evaluation.pictures): the PNG read back has the expected
layout and pixels."""
import jax
import numpy as np
import pytest
from PIL import Image

from dakd_jax import augment
from dakd_jax.evaluation import pictures

H, W = 48, 24
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def test_grid_png_layout_raw_tiles_and_view_tiles(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, H, W, 3), dtype=np.uint8)
  views = pictures.default_views("sysu_mm01")
  assert list(views) == ["visible", "channel", "infrared"]
  key = jax.random.key(3)
  path = tmp_path / "sub" / "grid.png"
  pictures.write_augmentation_grid(str(path), images, key, views)
  with Image.open(path) as png:
    assert png.format == "PNG" and png.mode == "RGB"
    grid = np.asarray(png)
  assert grid.shape == (6 * H, 4 * W, 3)
  # Expected view tiles: each view's batch (documented key usage), de-normalised in NumPy.
  augment_jit = jax.jit(augment.augment_batch, static_argnames="settings")
  expected = [np.round(np.clip(np.asarray(augment_jit(k, images, s)) * STD + MEAN, 0, 1) * 255)
              for k, s in zip(jax.random.split(key, 3), views.values())]
  for row in range(6):
    tile = lambda col: grid[row * H:(row + 1) * H, col * W:(col + 1) * W].astype(int)
    np.testing.assert_array_equal(tile(0), images[row])
    for col in range(1, 4):
      np.testing.assert_allclose(tile(col), expected[col - 1][row], rtol=0, atol=1)
  # Channel-exchanged and gray tiles differ from the raw images somewhere.
  assert np.any(grid[:, W:] != np.tile(grid[:, :W], (1, 3, 1)))


def test_grid_rejects_bad_inputs(tmp_path):
  views = pictures.default_views("regdb")
  with pytest.raises(ValueError, match="uint8"):
    pictures.write_augmentation_grid(str(tmp_path / "g.png"), np.zeros((2, H, W, 3)),
                                         jax.random.key(0), views)
  with pytest.raises(ValueError, match="AugmentSettings"):
    pictures.write_augmentation_grid(str(tmp_path / "g.png"),
                                         np.zeros((2, H, W, 3), np.uint8), jax.random.key(0), {})
