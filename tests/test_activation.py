"""Grad-CAM for retrieval (dakd_jax/evaluation/activation.py): the intercepted gradient against
a hand-written pooling head, the map arithmetic against NumPy, and a picture whose maps are
known by hand (a fake model where one feature-map cell carries each channel), read back."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dakd_jax import augment
from dakd_jax.evaluation import activation
from dakd_jax.models import resnet

HEIGHT, WIDTH = 64, 48  # layer4 is 4 x 3 with last stride 1


@pytest.fixture(scope="module")
def tiny_net():
  model = resnet.create_model(10, 4)
  variables = resnet.init_variables(model, jax.random.key(0), (HEIGHT, WIDTH))
  # Non-trivial pooling exponent and BNNeck statistics, so the head is not the identity.
  # NumPy's generator: jax.random per leaf shape compiled ~60 small programs (16 s of setup).
  rng = np.random.default_rng(1)
  variables = jax.tree.map(
      lambda leaf: jnp.asarray(leaf * (1 + 0.2 * rng.uniform(size=leaf.shape)), leaf.dtype),
      variables)
  variables["batch_stats"]["bnneck"]["mean"] = 0.1 * jnp.arange(32, dtype=jnp.float32) / 32
  images = jax.random.randint(jax.random.key(2), (3, HEIGHT, WIDTH, 3), 0, 256).astype(jnp.uint8)
  return model, variables, images, jnp.array([0, 1, 1], jnp.int32)


def hand_head(feature_map, variables):
  """GeM -> BNNeck (running statistics, no shift) -> unit, written out (method.md 2.1)."""
  p = variables["params"]["gem"]["p"]
  pooled = jnp.mean(jnp.maximum(feature_map, 1e-6) ** p, axis=(1, 2)) ** (1 / p)
  stats, scale = variables["batch_stats"]["bnneck"], variables["params"]["bnneck"]["scale"]
  features = (pooled - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * scale
  return features / jnp.linalg.norm(features, axis=1, keepdims=True)


@pytest.mark.slow
def test_intercepted_gradient_equals_gradient_of_hand_written_head(tiny_net):
  model, variables, images, modality = tiny_net
  forward = activation.make_model_forward(model)
  assert activation.make_model_forward(resnet.create_model(10, 4)) is forward  # cached
  targets = jax.random.normal(jax.random.key(3), (3, 32))
  feature_map, gradients = activation.feature_gradients(forward, variables, images, modality,
                                                        targets)
  out = model.apply(variables, augment.normalize(images), modality, train=False,
                    return_feature_map=True)
  np.testing.assert_array_equal(feature_map, out["feature_map"])
  np.testing.assert_allclose(hand_head(out["feature_map"], variables), out["embedding"],
                             atol=1e-5)
  expected = jax.grad(lambda a: jnp.sum(hand_head(a, variables) * targets))(out["feature_map"])
  assert np.abs(expected).max() > 1e-3
  np.testing.assert_allclose(gradients, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def numpy_bilinear(cam, out_h, out_w):
  """Half-pixel-centre bilinear upsampling with edge clamping, one axis after the other."""
  def axis_weights(in_size, out_size):
    source = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    matrix = np.zeros((out_size, in_size))
    matrix[np.arange(out_size), low] += 1 - (source - low)
    matrix[np.arange(out_size), high] += source - low
    return matrix
  rows, columns = axis_weights(cam.shape[0], out_h), axis_weights(cam.shape[1], out_w)
  return rows @ cam @ columns.T


def test_grad_cam_maps_match_numpy():
  rng = np.random.default_rng(0)
  feature_map = np.abs(rng.normal(size=(3, 4, 3, 5))).astype(np.float32)
  gradients = rng.normal(size=(3, 4, 3, 5)).astype(np.float32)
  gradients[0] = np.abs(gradients[0])  # all weights positive: a map everywhere
  gradients[2] = -np.abs(gradients[2])  # all weights negative: the map is zero everywhere
  maps = np.asarray(activation.grad_cam_maps(feature_map, gradients, (HEIGHT, WIDTH)))
  for image in range(3):
    weights = gradients[image].mean(axis=(0, 1))
    cam = np.maximum((feature_map[image] * weights).sum(-1), 0.0)
    expected = numpy_bilinear(np.float64(cam), HEIGHT, WIDTH)
    expected = expected / expected.max() if expected.max() > 0 else expected
    np.testing.assert_allclose(maps[image], expected, atol=1e-5)
  assert maps[2].max() == 0.0 and maps[0].max() == pytest.approx(1.0)


# Fake model: layer4 map 4 x 3 with 2 channels; channel 0 is 1 at cell (1, 2), channel 1 is 1
# at cell (3, 0); embedding = the map summed over positions (perturbed). Then d score / d map =
# target at every cell, weights = target, map = ReLU(t0 A0 + t1 A1): peak at (1, 2) when
# t0 > 0 > t1, at (3, 0) when t1 > 0 > t0.
CELLS = np.zeros((4, 3, 2), np.float32)
CELLS[1, 2, 0] = 1.0
CELLS[3, 0, 1] = 1.0
TRACES = []


def fake_forward(variables, images, modality, perturbation):
  TRACES.append(images.shape)
  feature_map = jnp.broadcast_to(CELLS * variables["gain"], (images.shape[0],) + CELLS.shape)
  perturbed = feature_map if perturbation is None else feature_map + perturbation
  return feature_map, perturbed.sum(axis=(1, 2))


def test_known_maps_are_drawn_brighter_where_high(tmp_path):
  unit = lambda v: np.asarray(v, np.float32) / np.linalg.norm(v)
  # Rows 0, 1: infrared queries (ids 5, 6); rows 2, 3: visible gallery (ids 5, 6).
  embeddings = np.stack([unit([1, -1]), unit([-1, 1]), unit([1, -0.8]), unit([-1, 0.9])])
  identities, modalities = np.array([5, 6, 5, 6]), np.array([1, 1, 0, 0])
  images = np.full((4, HEIGHT, WIDTH, 3), 128, np.uint8)
  grad_cam = activation.make_grad_cam(fake_forward)
  TRACES.clear()
  scale = 2
  out = activation.activation_picture(
      grad_cam, {"gain": jnp.float32(2.0)}, images, modalities, embeddings, [0, 1], [2, 3],
      str(tmp_path / "cam.png"), identities=identities, top_k=2, batch_size=4, scale=scale)
  np.testing.assert_array_equal(out["gallery"], [[2, 3], [3, 2]])
  np.testing.assert_array_equal(out["matches"], [[True, False], [True, False]])
  # By hand: row 0's targets (g2 for the query, q0 for the gallery) have t0 > 0 > t1, row 1's
  # the reverse. Upsampled (16 pixels per cell, half-pixel centres), the peak of a cell lies
  # on pixels 16y + 7..8 along an axis where the cell is inside, and on the whole outer half
  # of the cell along an axis where it touches the edge (clamped): cell (1, 2) peaks at rows
  # 23-24, columns 40-47; cell (3, 0) at rows 56-63, columns 0-7.
  high, low = {0: (24, 44), 1: (60, 4)}, {0: (60, 4), 1: (24, 44)}
  for row in range(2):
    np.testing.assert_allclose(out["maps"][row][:, high[row][0], high[row][1]], 1.0)
    np.testing.assert_allclose(out["maps"][row][:, low[row][0], low[row][1]], 0.0)
  picture = np.asarray(Image.open(out["path"]).convert("RGB")).astype(int)
  frames = [[activation.QUERY_COLOUR, activation.MATCH_COLOUR, activation.MISMATCH_COLOUR]] * 2
  for row in range(2):
    for column in range(3):
      left, top, _, _ = activation.panel_box(row, column, (HEIGHT, WIDTH), scale)
      assert tuple(picture[top + 1, left + 1]) == frames[row][column]

      def pixel(y, x):
        return picture[top + activation.BORDER + y * scale, left + activation.BORDER + x * scale]
      bright, dark = pixel(*high[row]), pixel(*low[row])
      assert bright.sum() > dark.sum() + 300  # grey 128 under inferno(1) vs inferno(0)
      assert np.abs(dark - 64).max() <= 2  # half grey, half (nearly) black
  # Two batches of 4 (the second padded) and a second picture: traced once.
  activation.activation_picture(grad_cam, {"gain": jnp.float32(1.0)}, images, modalities,
                                embeddings, [1, 0], [2, 3], str(tmp_path / "again.png"),
                                top_k=2, batch_size=4)
  assert len(TRACES) == 2  # one trace for shapes (eval_shape) + one for the gradient


def test_real_model_picture_ranks_and_skips_removed_pairs(tiny_net, tmp_path):
  model, variables, _, _ = tiny_net
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, HEIGHT, WIDTH, 3), dtype=np.uint8)
  images[:, 20:44, 12:36] = 255  # a bright block the maps may pick up
  modalities = np.array([1, 1, 0, 0, 0, 0, 0])
  grad_cam = activation.make_grad_cam(activation.make_model_forward(model))
  embeddings = np.asarray(model.apply(variables, augment.normalize(images), modalities,
                                      train=False)["embedding"])
  removed = np.zeros((2, 5), bool)
  removed[0, :2] = True  # query 0 may not see gallery rows 2 and 3
  out = activation.activation_picture(grad_cam, variables, images, modalities, embeddings,
                                      [0, 1], [2, 3, 4, 5, 6], str(tmp_path / "real.png"),
                                      removed=removed, top_k=4, batch_size=5)
  similarity = embeddings[[0, 1]] @ embeddings[2:].T
  expected = np.argsort(-np.where(removed, -np.inf, similarity), axis=1, kind="stable")[:, :4]
  expected = np.where(np.take_along_axis(removed, expected, 1), -1, expected + 2)
  np.testing.assert_array_equal(out["gallery"], expected)
  assert not np.isin(out["gallery"][0], [2, 3]).any() and out["gallery"][0, 3] == -1
  shown = out["maps"][:, :4]
  assert np.isfinite(shown).all() and shown.min() >= 0 and shown.max() <= 1
  assert np.all(out["maps"][0, 4] == 0)  # the empty panel
  assert out["matches"] is None
