"""Batch normalisation with statistics per group of samples and, optionally, per sample mask.

Part of the model (`resnet.py`): the per-modality stems normalise each image with statistics of
its own modality's images only (the mask), and the DAKD student normalises the visible and the
infrared half of one `[visible; infrared]` batch separately (the groups), which is the released
code's two separate forward passes done in one call (method.md 4.1). Conventions of method.md
2.3: momentum 0.9, epsilon 1e-5, biased batch variance, statistics and normalisation in float32.

The running averages move once per group, in group order, exactly as consecutive calls on the
groups would move them: for groups (v, i), `r <- m (m r + (1-m) s_v) + (1-m) s_i`.

Under model.conv_backward resolving to "custom" (XLA:CPU) every unmasked training-mode BN of the
network normalises with `normalize_over_batch`, whose gradient is hand-written (why: there).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# How the DAKD student gets per-modality BN statistics (config distill.student_forward): one
# call with two BN groups, or the released two calls.
STUDENT_FORWARDS = ("grouped", "two_calls")
# GroupedBatchNorm.backward: an unmasked training BN's gradient, JAX's or normalize_over_batch's.
BN_BACKWARDS = ("xla", "custom")


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32, or in float64 if it is (a float64 model checks equalities beyond float32
  rounding in the tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def batch_statistics(x: jax.Array, mask: jax.Array | None,
                     use_fast_variance: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, biased variance and count of the positions of one group of samples.

  Args:
    x: [m, ..., C] float32; statistics over every axis but the last.
    mask: [m] bool (only the true samples count) or None (all samples).
    use_fast_variance: E[x^2] - E[x]^2 clamped at 0 (Flax's BatchNorm formula, one pass);
      otherwise the two-pass E[(x - mean)^2]. Only without a mask.
  Returns:
    mean [C], var [C], count (a scalar: positions counted; for an empty mask 0, and mean and var
    are then 0).
  """
  axes = tuple(range(x.ndim - 1))
  if mask is None and use_fast_variance:
    mean = jnp.mean(x, axis=axes)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=axes) - jnp.square(mean))
    return mean, var, jnp.asarray(x.size // x.shape[-1], jnp.float32)
  if mask is None:
    mask = jnp.ones(x.shape[:1], bool)
  weights = mask.astype(jnp.float32).reshape(x.shape[:1] + (1,) * (x.ndim - 1))
  count = jnp.sum(weights)
  for size in x.shape[1:-1]:
    count = count * size
  # Clamp the count so that an empty mask yields zeros rather than NaNs.
  denom = jnp.maximum(count, 1.0)
  mean = jnp.sum(x * weights, axis=axes) / denom
  var = jnp.sum(jnp.square(x - mean) * weights, axis=axes) / denom
  return mean, var, count


class GroupedBatchNorm(nn.Module):
  """BatchNorm over channels with batch statistics per group of samples and per sample mask.

  Same variables as `nn.BatchNorm` (params `scale`, `bias`; batch_stats `mean`, `var`), so
  weights and checkpoints load identically whichever BN a layer uses. In training, the batch
  `[n, ..., C]` is cut into `groups` equal consecutive groups; each group is normalised with the
  mean and biased variance of its samples with `mask` true, and the running averages move once
  per group in group order, `r <- 0.9 r + 0.1 stat` (a group without masked samples leaves them
  unchanged; its output is finite and meaningless and must not be used). In inference the
  running averages are used for every sample. `backward` "custom" (training without a mask)
  gives the same values with a hand-written gradient (`normalize_over_batch`); it computes the
  one-pass variance, so it needs `use_fast_variance`. Masked calls keep JAX's gradient.
  """
  groups: int = 1
  use_fast_variance: bool = False  # nn.BatchNorm's one-pass variance; only without a mask
  backward: str = "xla"  # BN_BACKWARDS
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    """x: [n, ..., C]; mask: [n] bool or None (all samples); returns x's shape in dtype.

    Raises ValueError when training on a batch that `groups` does not divide, for a `backward`
    outside BN_BACKWARDS, and for "custom" without `use_fast_variance`.
    """
    if self.backward not in BN_BACKWARDS:
      raise ValueError(f"GroupedBatchNorm backward must be one of {BN_BACKWARDS}, got "
                       f"{self.backward!r}")
    if self.backward == "custom" and not self.use_fast_variance:
      raise ValueError("GroupedBatchNorm backward 'custom' computes the one-pass variance; "
                       "set use_fast_variance=True")
    channels = x.shape[-1]
    scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
    bias = self.param("bias", self.bias_init, (channels,), jnp.float32) if self.use_bias \
        else None
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    x32 = at_least_float32(x)
    if not train:
      return _normalize(x32, ra_mean.value, ra_var.value, scale, bias).astype(self.dtype)
    if x.shape[0] % self.groups:
      raise ValueError(f"a batch of {x.shape[0]} samples cannot be cut into {self.groups} equal "
                       "BN groups; use a batch divisible by the number of groups")
    if mask is None and self.backward == "custom":
      grouped = x32.reshape((self.groups, x.shape[0] // self.groups) + x.shape[1:])
      y, means, variances = normalize_over_batch(
          grouped, scale, jnp.zeros_like(scale) if bias is None else bias)
      count = jnp.asarray(grouped[0].size // channels, jnp.float32)
      self._move_running_averages(ra_mean, ra_var,
                                  [(m, v, count) for m, v in zip(means, variances)], False)
      return y.reshape(x.shape).astype(self.dtype)
    if self.groups == 1:
      mean, var, count = batch_statistics(x32, mask, self.use_fast_variance and mask is None)
      self._move_running_averages(ra_mean, ra_var, [(mean, var, count)], mask is not None)
      return _normalize(x32, mean, var, scale, bias).astype(self.dtype)
    # Each group's statistics come from the reductions a call on that group alone would run.
    parts = jnp.split(x32, self.groups)
    masks = [None] * self.groups if mask is None else jnp.split(mask, self.groups)
    statistics = [batch_statistics(part, part_mask, self.use_fast_variance and mask is None)
                  for part, part_mask in zip(parts, masks)]
    self._move_running_averages(ra_mean, ra_var, statistics, mask is not None)
    if mask is not None:
      # Masked (the stems): XLA fuses a slice that only feeds the masked reductions into them
      # in another order (1 ulp off a separate call); normalising the slices keeps them exact.
      outputs = [_normalize(part, mean, var, scale, bias)
                 for part, (mean, var, _) in zip(parts, statistics)]
      return jnp.concatenate(outputs).astype(self.dtype)
    # Unmasked: the normalisation is elementwise, so it runs once on a [groups, m, ..., C] view
    # without copying the groups apart and back together.
    grouped = x32.reshape((self.groups, x.shape[0] // self.groups) + x.shape[1:])
    per_group = (1,) * (x.ndim - 1) + (x.shape[-1],)
    mean = jnp.stack([m.reshape(per_group) for m, _, _ in statistics])
    var = jnp.stack([v.reshape(per_group) for _, v, _ in statistics])
    y = _normalize(grouped, mean, var, scale, bias)
    return y.reshape(x.shape).astype(self.dtype)

  def _move_running_averages(self, ra_mean, ra_var, statistics, is_masked: bool) -> None:
    """r <- 0.9 r + 0.1 stat once per group, in order; a group without samples leaves r."""
    if self.is_initializing():
      return
    for mean, var, count in statistics:
      moved_mean = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * mean
      moved_var = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * var
      if is_masked:
        moved_mean = jnp.where(count > 0, moved_mean, ra_mean.value)
        moved_var = jnp.where(count > 0, moved_var, ra_var.value)
      ra_mean.value, ra_var.value = moved_mean, moved_var


def _normalize(x, mean, var, scale, bias):
  """(x - mean) * rsqrt(var + eps) * scale + bias in float32, Flax's order of operations."""
  y = (x - mean) * (jax.lax.rsqrt(var + BN_EPSILON) * scale)
  return y if bias is None else y + bias


@jax.custom_vjp
def normalize_over_batch(x: jax.Array, scale: jax.Array,
                         bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BN of each group with its own batch statistics, with a hand-written gradient.

  x: [G, m, ..., C] float32 (or float64); scale, bias: [C]. Returns (y like x, mean [G, C],
  var [G, C]): mean and biased variance over each group's samples and positions, the variance
  in one pass (E[x^2] - E[x]^2 clamped at 0, as nn.BatchNorm's), and y = (x - mean) *
  (rsqrt(var + eps) * scale) + bias in flax's order of operations.

  Why (model.conv_backward "custom", XLA:CPU): differentiated by JAX, the formula keeps
  x - mean as a residual, so XLA writes that centred copy of every BN input in the forward pass
  (a tensor the size of the activations, ~5% of a ResNet-50 step on one core). The gradient
  here keeps x itself and never forms x - mean as a tensor (XLA would write it: the sums and
  dx both read it):
    dbias = sum(gy), dscale = r S   (S = sum(gy (x - mean)) = sum(gy x) - mean sum(gy),
                                     r = rsqrt(var + eps), sums per group)
    dx = scale r (gy - dbias_g / N - (x - mean) r^2 S_g / N) + gmean / N + 2 gvar (x - mean) / N,
  computed as a gy + b x + c with per-channel a, b, c; N the positions per group; gmean and
  gvar (the cotangents of the returned statistics) are zero in training, where the statistics
  only move the running averages. Where the clamp is active (a channel constant within a
  group) autodiff's gradient through the variance is 0 and this one is the unclamped
  formula's; x - mean is 0 there, so both agree up to rounding.
  """
  return _normalize_over_batch_forward(x, scale, bias)[0]


def _group_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim - 1))


def _per_group(stat: jax.Array, x: jax.Array) -> jax.Array:
  """[G, C] -> [G, 1, ..., 1, C], broadcastable against x."""
  return stat.reshape((stat.shape[0],) + (1,) * (x.ndim - 2) + (stat.shape[-1],))


def _normalize_over_batch_forward(x, scale, bias):
  # Each group's one-pass statistics, as an unmasked GroupedBatchNorm computes them.
  mean, var = jax.vmap(lambda group: batch_statistics(group, None, True)[:2])(x)
  y = _normalize(x, _per_group(mean, x), _per_group(var, x), scale, bias)
  return (y, mean, var), (x, mean, var, scale)


def _normalize_over_batch_backward(residuals, cotangents):
  x, mean, var, scale = residuals
  gy, gmean, gvar = cotangents
  axes = _group_axes(x)
  count = x.size // (x.shape[0] * x.shape[-1])
  inv_std = jax.lax.rsqrt(var + BN_EPSILON)
  # Per-channel coefficients of dx = a gy + b x + c: no tensor the size of x is written but dx
  # (a centred x shared by the sums and dx would be).
  sum_gy = jnp.sum(gy, axis=axes)
  sum_gy_centred = jnp.sum(gy * x, axis=axes) - mean * sum_gy
  a = scale * inv_std
  b = -a * jnp.square(inv_std) * sum_gy_centred / count + 2.0 * gvar / count
  c = -a * sum_gy / count - b * mean + gmean / count
  per_group = functools.partial(_per_group, x=x)
  dx = per_group(a) * gy + (per_group(b) * x + per_group(c))
  dscale = jnp.sum(inv_std * sum_gy_centred, axis=0)
  return dx, dscale, jnp.sum(sum_gy, axis=0)


normalize_over_batch.defvjp(_normalize_over_batch_forward, _normalize_over_batch_backward)


def repeat_running_average_update(update: Callable[[Any], Any], before: Any, after: Any) -> Any:
  """The running averages after applying a training-mode BN update a second time.

  `update` maps a batch_stats tree to the tree after one training-mode pass (or sequence of
  passes) on fixed inputs and parameters; `after = update(before)`. Training-mode outputs and
  batch statistics do not depend on the running averages, so per element `update` is affine,
  `r -> a r + d` with `a = m^k` for a leaf moved k times (k = 0, 1, 2 ... depending on the
  layer: a stem BN that saw no sample of its modality has k = 0). Hence
  `update(after) = a after + d = after + a (after - before)`, with no further forward pass: `a`
  is the derivative of `update` along a tangent of ones, whose trace touches only the
  running-average arithmetic (the forward pass it carries is unused, and XLA removes it).
  This is the released code's duplicated forward pass (method.md 4.7, distill.double_bn_update).

  Args:
    update: batch_stats -> batch_stats (same tree), as above.
    before, after: the trees before and after one update.
  Returns:
    The tree update(update(before)), leaves of `after`'s dtypes.
  """
  _, slope = jax.jvp(update, (before,), (jax.tree.map(jnp.ones_like, before),))
  return jax.tree.map(lambda old, new, a: new + a * (new - old), before, after, slope)
