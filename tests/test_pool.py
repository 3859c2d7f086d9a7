"""dakd_jax.models.pool: the max-pool's hand-written gradient against autodiff's.

The expectation is `jax.grad` through flax's `nn.max_pool` (JAX's reduce-window gradient, not
written here) where every window's maximum is unique, and a gradient placed by hand where
windows tie. The whole network with one setting against the other is tests/test_conv.py's
network test (the setting chooses both).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax.models import pool
from dakd_jax.models import resnet
from tests.test_resnet import randomise, training_jaxpr

# (height, width, window, stride, padding): the stem's 3x3/2 pad 1 at odd and even sizes, and
# other pools the function accepts.
SHAPES = [(12, 8, 3, 2, 1), (13, 7, 3, 2, 1), (6, 3, 3, 2, 1), (8, 6, 2, 2, 0), (7, 9, 3, 1, 1)]


def pool_args(window, stride, padding):
  return (window, window), (stride, stride), ((padding, padding), (padding, padding))


def grad_of(max_pool, x, upstream, window, stride, padding):
  def loss(x):
    return jnp.sum(max_pool(x, *pool_args(window, stride, padding)) * upstream)
  return jax.jit(jax.grad(loss))(x)


def flax_max_pool(x, window, strides, padding):
  return nn.max_pool(x, window, strides=strides, padding=padding)


def random_case(shape, dtype, seed=0):
  height, width, window, stride, padding = shape
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, height, width, 3)), dtype)
  out = flax_max_pool(x, *pool_args(window, stride, padding))
  upstream = jnp.asarray(rng.normal(size=out.shape), dtype)
  return x, upstream


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}x{}-{}x{}/{}".format(*s))
def test_gradient_and_values_equal_autodiff_where_maxima_are_unique(shape, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    x, upstream = random_case(shape, dtype)
    window, stride, padding = shape[2:]
    np.testing.assert_array_equal(pool.max_pool_nhwc(x, *pool_args(window, stride, padding)),
                                  flax_max_pool(x, *pool_args(window, stride, padding)))
    expected = grad_of(flax_max_pool, x, upstream, *shape[2:])
    actual = grad_of(pool.max_pool_nhwc, x, upstream, *shape[2:])
    assert actual.dtype == dtype
    # An input that is the maximum of overlapping windows (up to 9 at stride 1) sums their
    # gradients in another order than JAX's scatter: equal to a few rounding steps of the sum.
    bound = 8 * np.finfo(dtype).eps * float(np.max(np.abs(upstream)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)
    assert np.count_nonzero(np.asarray(expected)) > 0


def test_bfloat16_gradient_within_its_rounding():
  x, upstream = random_case(SHAPES[0], jnp.bfloat16)
  expected = grad_of(flax_max_pool, x, upstream, 3, 2, 1).astype(jnp.float32)
  actual = grad_of(pool.max_pool_nhwc, x, upstream, 3, 2, 1)
  assert actual.dtype == jnp.bfloat16
  # Sums of up to 4 gradients rounded to 8 bits in another order: a few of its rounding steps.
  bound = 4 * float(jnp.finfo(jnp.bfloat16).eps) * float(np.max(np.abs(upstream.astype(float))))
  np.testing.assert_allclose(actual.astype(jnp.float32), expected, rtol=0, atol=bound)
  assert np.mean(np.asarray(actual.astype(jnp.float32)) == np.asarray(expected)) > 0.95


def test_tied_windows_route_each_gradient_to_their_first_tap():
  """A 4x4 map of zeros (a ReLU's dead region), 3x3/2 pad 1: output (i, j) reads rows
  2i-1..2i+1 and columns 2j-1..2j+1, whose first real tap is (2i-1, 2j-1) clipped to the map,
  i.e. (0, 0), (0, 1), (1, 0), (1, 1) for the four outputs. Each gets its gradient once."""
  x = jnp.zeros((1, 4, 4, 1), jnp.float32)
  upstream = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.float32).reshape(1, 2, 2, 1)
  actual = np.asarray(grad_of(pool.max_pool_nhwc, x, upstream, 3, 2, 1))[0, :, :, 0]
  expected = np.zeros((4, 4), np.float32)
  expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1.0, 2.0, 3.0, 4.0
  np.testing.assert_array_equal(actual, expected)


def test_the_setting_chooses_the_gradient_like_the_convolutions():
  assert pool.max_pool_for("xla") is pool.max_pool_autodiff
  assert pool.max_pool_for("custom") is pool.max_pool_nhwc
  assert pool.max_pool_for("auto", backend="cpu") is pool.max_pool_nhwc
  assert pool.max_pool_for("auto", backend="gpu") is pool.max_pool_autodiff
  with pytest.raises(ValueError, match="conv_backward must be one of"):
    pool.max_pool_for("fast")


@pytest.mark.parametrize("setting, autodiff_pool", [("xla", True), ("custom", False)])
def test_the_network_stem_pool_takes_the_models_setting(setting, autodiff_pool):
  """The network's gradient contains JAX's max-pool transpose (select_and_scatter_add) under
  'xla' and not under 'custom': tests/test_conv.py's whole-network comparison would also pass
  if the model ignored the setting for its pool."""
  jaxpr = str(training_jaxpr(setting, jnp.array([0, 1]), differentiate=True))
  assert ("select_and_scatter_add" in jaxpr) == autodiff_pool


@pytest.mark.slow  # two float64 ResNet-18 gradient compilations: about 12 s
def test_the_jitted_network_gradient_equals_autodiffs_where_xla_recomputes_the_pool_input():
  """Regression: the hand-written gradient used to find each window's maximum in the backward
  pass by comparing the input with the pooled output. Under jit XLA recomputed the input (the
  stem's BN and ReLU, fused into the comparison) with another rounding than the pooled value's,
  so outputs whose maximum no longer compared equal lost their gradient: this network's
  stem_visible bn1 bias gradient came out 6.13 where autodiff's is 0.90 (float64, three visible
  images). The window index is now found in the forward pass."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(size=(3, 32, 16, 3)))
    weights = jnp.arange(3 * 32, dtype=jnp.float64).reshape(3, 32) / 100.0
    grads = {}
    for setting in ("xla", "custom"):
      model = resnet.create_model(18, 4, conv_backward=setting, dtype=jnp.float64,
                                  non_local=False)
      variables = resnet.init_variables(model, jax.random.key(0), (32, 16))
      variables = jax.tree.map(lambda v: v.astype(jnp.float64), randomise(variables, 1))

      def loss(params, model=model, variables=variables):
        out, _ = model.apply({**variables, "params": params}, images, jnp.zeros(3, jnp.int32),
                             train=True, mutable=["batch_stats"])
        return jnp.sum(out["features"] * weights)
      grads[setting] = jax.jit(jax.grad(loss))(variables["params"])
    largest = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(grads["xla"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * largest),
                 grads["custom"], grads["xla"])
