"""dakd_jax.models.batch_norm: the hand-written training-mode BN gradient against autodiff's.

The expectation is `jax.grad` of the BN formula written out here (per-group mean, one-pass
variance, flax's normalisation), and flax's own `nn.BatchNorm` for the layer; then the network's
wiring (every unmasked training BN takes the setting's gradient).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax.models import batch_norm
from tests.test_resnet import training_jaxpr


def formula(x, scale, bias):
  """Training BN of each group x[g] ([G, m, ..., C]) written out, differentiated by JAX."""
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.maximum(0.0, jnp.mean(x * x, axis=axes) - mean * mean)
  shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  y = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + 1e-5) * scale + bias
  return y, mean, var


def gradients(function, x, scale, bias, cotangents):
  _, pullback = jax.vjp(function, x, scale, bias)
  return pullback(cotangents)


# [G, m, ..., C]: the network's 4-D maps with one and two groups, the BNNeck's 2-D features.
SHAPES = [(1, 6, 5, 3, 8), (2, 3, 4, 5, 7), (2, 5, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_values_and_gradients_equal_autodiff_of_the_formula(shape, dtype, tolerance):
  """Every output's cotangent non-zero (the statistics' too, although training gives them
  none), the input off-centre and scaled so the mean and the variance both matter."""
  with jax.enable_x64(dtype == jnp.float64):
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.normal(size=shape) * 3.0 + 2.0, dtype)
    scale = jnp.asarray(rng.normal(size=shape[-1]), dtype)
    bias = jnp.asarray(rng.normal(size=shape[-1]), dtype)
    outputs = batch_norm.normalize_over_batch(x, scale, bias)
    expected_outputs = formula(x, scale, bias)
    cotangents = tuple(jnp.asarray(rng.normal(size=out.shape), dtype) for out in outputs)
    actual = gradients(batch_norm.normalize_over_batch, x, scale, bias, cotangents)
    expected = gradients(formula, x, scale, bias, cotangents)
    for value, reference in zip(outputs + actual, expected_outputs + expected):
      assert value.dtype == dtype and value.shape == reference.shape
      np.testing.assert_allclose(value, reference, rtol=tolerance,
                                 atol=tolerance * float(np.max(np.abs(reference))))


def apply(layer, variables, x):
  """Training-mode call of flax's BatchNorm or ours (no mask); (output, new batch_stats)."""
  if isinstance(layer, nn.BatchNorm):
    out, updates = layer.apply(variables, x, mutable=["batch_stats"])
  else:
    out, updates = layer.apply(variables, x, None, True, mutable=["batch_stats"])
  return out, updates["batch_stats"]


@pytest.mark.parametrize("groups", [1, 2])
def test_layer_with_the_custom_gradient_equals_autodiffs_layer(groups):
  """GroupedBatchNorm(backward='custom') against what the network used before it: flax's
  nn.BatchNorm (one group) or the grouped layer differentiated by JAX (two groups). Same
  variables, outputs and running averages; gradients within float32 rounding."""
  rng = np.random.default_rng(groups)
  x = jnp.asarray(rng.normal(size=(4, 5, 3, 6)) * 2.0 - 1.0, jnp.float32)
  upstream = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  custom = batch_norm.GroupedBatchNorm(groups=groups, use_fast_variance=True, backward="custom")
  autodiff = nn.BatchNorm(use_running_average=False, momentum=batch_norm.BN_MOMENTUM,
                          epsilon=batch_norm.BN_EPSILON) if groups == 1 else \
      batch_norm.GroupedBatchNorm(groups=groups, use_fast_variance=True)
  variables = custom.init(jax.random.key(0), x, None, False)
  if groups == 1:
    assert jax.tree.structure(autodiff.init(jax.random.key(0), x)) == \
        jax.tree.structure(variables)
  # Scale, shift and running averages away from their initial 1 / 0.
  variables = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype),
                           variables)

  def loss(layer, params, x):
    out, stats = apply(layer, {**variables, "params": params}, x)
    return jnp.sum(out * upstream), (out, stats)

  results = {}
  for name, layer in (("custom", custom), ("autodiff", autodiff)):
    results[name] = jax.value_and_grad(functools.partial(loss, layer), argnums=(0, 1),
                                       has_aux=True)(variables["params"], x)
  (_, (out, stats)), grads = results["custom"]
  (_, (expected_out, expected_stats)), expected_grads = results["autodiff"]
  np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               stats, expected_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b)))), grads, expected_grads)


def test_a_masked_call_keeps_autodiffs_gradient():
  """The stems' masked BN has no hand-written gradient: 'custom' computes exactly what 'xla'
  does there (same program)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 2, 5)), jnp.float32)
  mask = jnp.asarray([True, False, True, True])
  layers = [batch_norm.GroupedBatchNorm(use_fast_variance=True, backward=backward)
            for backward in ("custom", "xla")]
  variables = layers[0].init(jax.random.key(0), x, mask, False)
  programs = [str(jax.make_jaxpr(jax.grad(
      lambda x, layer=layer: layer.apply(variables, x, mask, True,
                                         mutable=["batch_stats"])[0].sum()))(x))
              for layer in layers]
  assert programs[0] == programs[1] and "custom_vjp" not in programs[0]


def test_an_unknown_backward_and_a_two_pass_custom_one_are_refused():
  with pytest.raises(ValueError, match="backward must be one of"):
    batch_norm.GroupedBatchNorm(backward="fast").init(jax.random.key(0), jnp.zeros((2, 3)),
                                                      None, True)
  with pytest.raises(ValueError, match="set use_fast_variance=True"):
    batch_norm.GroupedBatchNorm(backward="custom").init(jax.random.key(0), jnp.zeros((2, 3)),
                                                        None, True)


@pytest.mark.parametrize("setting, custom_count", [("xla", 0), ("custom", 20)])
def test_every_unmasked_training_bn_of_the_network_takes_the_setting(setting, custom_count):
  """ResNet-18 at width 4 without non-local blocks: 8 blocks x 2 BNs, 3 downsample BNs and the
  BNNeck = 20 BNs normalise with batch statistics and no mask; the two stems' BNs have masks.
  tests/test_conv.py's whole-network comparison would also pass if the model ignored the
  setting for its BNs."""
  jaxpr = str(training_jaxpr(setting, jnp.array([0, 1])))
  assert jaxpr.count("name=normalize_over_batch") == custom_count
