"""dakd_jax.models.conv: the hand-written convolution gradient against autodiff's.

The expectation is always `jax.grad` through `lax.conv_general_dilated` itself (autodiff's
transposed convolutions, written by JAX, not here), at every convolution kind and padding the
ResNet has, odd and even sizes, float32, float64 and bfloat16; then the whole network with one
setting against the other.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dakd_jax import builders
from dakd_jax import config as config_lib
from dakd_jax.models import conv
from dakd_jax.models import resnet
from tests.test_resnet import randomise

ALL_KINDS = frozenset({(1, 1), (1, 2), (3, 1), (3, 2), (7, 2)})
# (kernel, stride, padding, height, width, C_in, C_out): the network's kinds with its paddings
# (k // 2; none for 1x1), an odd and an even input size each.
SHAPES = [
    (7, 2, 3, 33, 18, 3, 8),    # stem
    (7, 2, 3, 32, 17, 3, 8),
    (1, 1, 0, 9, 7, 16, 8),     # bottleneck conv1 / conv3, non-local
    (1, 1, 0, 6, 4, 8, 1),      # non-local c -> 1
    (1, 2, 0, 9, 7, 16, 12),    # downsample projection
    (1, 2, 0, 10, 8, 16, 12),
    (3, 1, 1, 9, 6, 8, 8),      # bottleneck conv2
    (3, 1, 1, 8, 7, 8, 8),
    (3, 2, 1, 9, 7, 8, 16),     # strided bottleneck conv2
    (3, 2, 1, 10, 8, 8, 16),
    (1, 1, 0, 6, 3, 1, 8),      # non-local 1 -> c (its output conv), at the demo's 6x3
]


def shape_id(shape):
  kernel, stride, _, height, width, _, _ = shape
  return f"{kernel}x{kernel}/{stride}-{height}x{width}"


def grads(convolve, images, kernel, stride, padding, upstream):
  """d/d(images, kernel) of sum(conv(images, kernel) * upstream)."""
  def loss(x, w):
    y = convolve(x, w, (stride, stride), ((padding,) * 2,) * 2,
                 dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, conv.NHWC))
    return jnp.sum(y * upstream)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(images, kernel)


def random_case(shape, dtype, seed=0):
  kernel, stride, padding, height, width, c_in, c_out = shape
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(2, height, width, c_in)), dtype)
  weights = jnp.asarray(rng.normal(size=(kernel, kernel, c_in, c_out)), dtype)
  out_hw = [(size + 2 * padding - kernel) // stride + 1 for size in (height, width)]
  upstream = jnp.asarray(rng.normal(size=(2, *out_hw, c_out)), dtype)
  return images, weights, stride, padding, upstream


def relative_error(expected, actual):
  expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
  return np.max(np.abs(expected - actual)) / np.max(np.abs(expected))


def hand_written():
  return conv.conv_general_dilated_for("custom", kinds=ALL_KINDS)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_float32_gradients_equal_autodiff(shape):
  images, weights, stride, padding, upstream = random_case(shape, jnp.float32)
  expected = grads(lax.conv_general_dilated, images, weights, stride, padding, upstream)
  actual = grads(hand_written(), images, weights, stride, padding, upstream)
  for name, e, a in zip(("images", "kernel"), expected, actual):
    assert a.dtype == jnp.float32 and a.shape == e.shape
    assert relative_error(e, a) < 1e-5, name


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5], SHAPES[8]], ids=shape_id)
def test_float64_gradients_equal_autodiff_to_float64_rounding(shape):
  with jax.enable_x64(True):
    images, weights, stride, padding, upstream = random_case(shape, jnp.float64)
    expected = grads(lax.conv_general_dilated, images, weights, stride, padding, upstream)
    actual = grads(hand_written(), images, weights, stride, padding, upstream)
    for e, a in zip(expected, actual):
      assert a.dtype == jnp.float64
      assert relative_error(e, a) < 1e-12


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[6], SHAPES[9]], ids=shape_id)
def test_bfloat16_gradients_within_bfloat16_rounding(shape):
  """Both sides in bfloat16 against float32 autodiff of the same bfloat16-valued inputs: the
  hand-written gradient (float32 sums, rounded once) is no further off than bfloat16 allows."""
  case = random_case(shape, jnp.bfloat16)
  exact = grads(lax.conv_general_dilated, *(x.astype(jnp.float32) if hasattr(x, "dtype") else x
                                            for x in case))
  actual = grads(hand_written(), *case)
  for e, a in zip(exact, actual):
    assert a.dtype == jnp.bfloat16
    assert relative_error(e, a) < 2 ** -7  # bfloat16 keeps 8 significant bits


def test_forward_is_lax_conv_and_the_unlisted_cases_are_passed_through():
  images, weights, stride, padding, _ = random_case(SHAPES[8], jnp.float32)
  pads = ((padding,) * 2,) * 2
  numbers = lax.conv_dimension_numbers(images.shape, weights.shape, conv.NHWC)
  expected = lax.conv_general_dilated(images, weights, (stride,) * 2, pads,
                                      dimension_numbers=numbers)
  convolve = hand_written()
  np.testing.assert_array_equal(
      convolve(images, weights, (stride,) * 2, pads, dimension_numbers=numbers), expected)
  jaxpr = str(jax.make_jaxpr(lambda x, w: convolve(x, w, (stride,) * 2, pads,
                                                   dimension_numbers=numbers))(images, weights))
  assert "custom_vjp" in jaxpr
  # 3x3/2 is not in the kinds handed over, and a dilated kernel never is: plain lax.
  only_1x1 = conv.conv_general_dilated_for("custom", kinds={(1, 1)})
  for call in (lambda x, w: only_1x1(x, w, (2, 2), pads, dimension_numbers=numbers),
               lambda x, w: convolve(x, w, (1, 1), pads, rhs_dilation=(2, 2),
                                     dimension_numbers=numbers)):
    assert "custom_vjp" not in str(jax.make_jaxpr(call)(images, weights))


def test_setting_resolves_by_backend_and_names_the_field_when_wrong():
  assert conv.conv_general_dilated_for("auto", backend="gpu") is lax.conv_general_dilated
  assert conv.conv_general_dilated_for("xla", backend="cpu") is lax.conv_general_dilated
  assert conv.resolve_conv_backward("auto", backend="cpu") == "custom"
  assert conv.resolve_conv_backward("custom", backend="tpu") == "custom"
  # One function object per setting, so modules holding it compare equal across calls.
  assert conv.conv_general_dilated_for("custom") is conv.conv_general_dilated_for("auto", "cpu")
  with pytest.raises(ValueError, match="conv_backward must be one of"):
    conv.resolve_conv_backward("fast")
  config = config_lib.load_config("configs/demo.py", {"model.conv_backward": "fast"},
                                  validate_config=False)
  with pytest.raises(config_lib.ConfigError, match=r"config.model.conv_backward = 'fast'"):
    config_lib.validate(config, num_devices=1)
  for setting in conv.CONV_BACKWARDS:
    config_lib.load_config("configs/demo.py", {"model.conv_backward": setting})


def network_grads(conv_backward, variables, images, modality):
  """(parameter gradients, moved running averages) of a training step of the width-4 ResNet-50."""
  model = resnet.create_model(50, 4, conv_backward=conv_backward)

  def loss(params):
    out, updates = model.apply({**variables, "params": params}, images, modality, train=True,
                               mutable=["batch_stats"])
    loss = jnp.mean(jnp.square(out["features"])) + jnp.mean(out["pooled"])
    return loss, updates["batch_stats"]
  grads, batch_stats = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  return grads, batch_stats


@pytest.mark.slow  # two ResNet-50 gradient compilations: about 60 s on 2 quiet cores
def test_network_parameter_gradients_and_variables_match_xla():
  """ResNet-50 layout (bottlenecks, downsample, non-local, two stems) at width 4: every
  parameter's gradient with the hand-written convolution, max-pool and BN gradients equals
  autodiff's, and the running averages move the same. BN parameters are randomised so the
  non-local blocks (output BN scale 0 at init) are not the identity and every convolution gets
  a non-zero gradient."""
  shape = (64, 32)
  initial = resnet.init_variables(resnet.create_model(50, 4, conv_backward="xla"),
                                  jax.random.key(0), shape)
  # The same variables (names, shapes, dtypes) fit both networks: traced, not compiled.
  custom_shapes = jax.eval_shape(lambda key: resnet.init_variables(
      resnet.create_model(50, 4, conv_backward="custom"), key, shape), jax.random.key(0))
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), custom_shapes)
          == jax.tree.map(lambda a: (a.shape, a.dtype), initial))
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(4, *shape, 3)), jnp.float32)
  modality = jnp.asarray([0, 1, 1, 0], jnp.int32)
  variables = randomise(initial, 4)
  expected, expected_stats = network_grads("xla", variables, images, modality)
  actual, actual_stats = network_grads("custom", variables, images, modality)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               actual_stats, expected_stats)
  expected = flax.traverse_util.flatten_dict(expected)
  actual = flax.traverse_util.flatten_dict(actual)
  assert actual.keys() == expected.keys()
  largest = max(float(np.max(np.abs(value))) for value in expected.values())
  for path, value in expected.items():
    difference = np.max(np.abs(np.asarray(actual[path]) - np.asarray(value)))
    # Relative to the leaf, but at least to 1% of the network's largest gradient: a per-channel
    # constant that only feeds training-mode BNs (a conv bias before its BN, a non-local output
    # BN's shift before the next block's convs and BNs) has exact gradient 0, and both sides
    # then hold rounding noise.
    scale = max(float(np.max(np.abs(value))), 1e-2 * largest)
    assert difference <= 1e-4 * scale, (path, difference, scale)


@pytest.mark.parametrize("config_path, custom_on_cpu", [
    ("configs/sysu.py", True), ("configs/regdb.py", True), ("configs/llcm.py", True),
    ("configs/demo.py", False)])
def test_shipped_configs_choose_the_gradient_by_backend(config_path, custom_on_cpu):
  """The default (base.py) is auto: the real datasets' networks take the hand-written 1x1
  gradients on CPU and autodiff's on accelerators; the demo keeps autodiff's (its published
  numbers were measured so)."""
  config = config_lib.load_config(config_path, {"model.depth": 18, "model.width": 4},
                                  validate_config=False)
  model = builders.model_from_config(config)
  images = jnp.zeros((2, 96, 48, 3), jnp.float32)
  modality = jnp.array([0, 1], jnp.int32)
  variables = resnet.init_variables(model, jax.random.key(0), (96, 48))

  program = str(jax.make_jaxpr(lambda v: model.apply(v, images, modality, train=False))(
      variables))
  assert ("custom_vjp" in program) == custom_on_cpu
  assert conv.resolve_conv_backward(config.model.conv_backward, backend="gpu") == "xla"
