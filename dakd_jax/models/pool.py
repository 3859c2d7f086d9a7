"""The stem's max-pool with its backward pass written in the forms XLA:CPU runs fast.

Chosen with the convolutions' gradients (`model.conv_backward`, see conv.py): the forward pass
is always flax's `nn.max_pool` (a reduce-window max); only the gradient differs.

Why: autodiff's gradient of a max-pool is a variadic reduce-window that carries the window's
index along with its maximum (four int32 index arrays the size of the padded input, one per
dimension), then scatters; XLA:CPU runs it on its generic loop path, 0.3 s of a 3.9 s ResNet-50
training step on one core (24 images of 192x96), where PyTorch's takes milliseconds. The
hand-written gradient routes each output's gradient to the first tap of its window (row-major)
that equals the window's maximum: k*k strided slices compared with the output, and the same
k*k taps placed back on the input grid with interior padding (as conv.py places a strided
output gradient), summed. Equal to autodiff's wherever a window's maximum is unique. Where it is
not (after a ReLU, a window of zeros) any tap is a valid subgradient, and in the network the
choice does not matter: the ReLU's gradient is zero at every tapped zero.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dakd_jax.models.conv import resolve_conv_backward


def max_pool_for(setting: str, backend: str | None = None):
  """max_pool(x [n, H, W, C], window, strides, padding ((low, high), (low, high))) for a
  model.conv_backward setting: autodiff's gradient when it resolves to 'xla', else the
  hand-written one. The forward values are the same either way."""
  if resolve_conv_backward(setting, backend) == "xla":
    return max_pool_autodiff
  return max_pool_nhwc


def max_pool_autodiff(x, window, strides, padding):
  """flax's `nn.max_pool` (a reduce-window max) for NHWC `x`, differentiated by JAX."""
  return nn.max_pool(x, tuple(window), strides=tuple(strides),
                     padding=tuple(tuple(p) for p in padding))


def max_pool_nhwc(x, window, strides, padding):
  """The same max-pool; its gradient is the module docstring's."""
  return _max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return max_pool_autodiff(x, window, strides, padding)


def _max_pool_forward(x, window, strides, padding):
  pooled = max_pool_autodiff(x, window, strides, padding)
  return pooled, (x, pooled)


def _max_pool_backward(window, strides, padding, residuals, grad):
  x, pooled = residuals
  return (max_pool_input_gradient(x, pooled, grad, window, strides, padding),)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool_input_gradient(x, pooled, grad, window, strides, padding):
  """d loss / d x [n, H, W, C] from the pooled output and its gradient [n, H', W', C]: each
  output's gradient goes to the first window tap (row-major) equal to its maximum."""
  (pad_h, pad_w), (stride_h, stride_w) = padding, strides
  padded = lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                   [(0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0)])
  out_h, out_w = pooled.shape[1:3]
  zero = jnp.zeros((), grad.dtype)
  taken = jnp.zeros(pooled.shape, bool)
  total = None
  for row in range(window[0]):
    for col in range(window[1]):
      tap = lax.slice(padded, (0, row, col, 0),
                      (padded.shape[0], row + (out_h - 1) * stride_h + 1,
                       col + (out_w - 1) * stride_w + 1, padded.shape[3]),
                      (1, stride_h, stride_w, 1))
      chosen = (tap == pooled) & ~taken
      taken = taken | chosen
      routed = jnp.where(chosen, grad, zero)
      # Back onto the padded input grid: tap (row, col) of output i sits at row + i * stride.
      placed = lax.pad(routed, zero, [
          (0, 0, 0),
          (row, padded.shape[1] - row - (out_h - 1) * stride_h - 1, stride_h - 1),
          (col, padded.shape[2] - col - (out_w - 1) * stride_w - 1, stride_w - 1),
          (0, 0, 0)])
      total = placed if total is None else total + placed
  return lax.slice(total, (0, pad_h[0], pad_w[0], 0),
                   (total.shape[0], pad_h[0] + x.shape[1], pad_w[0] + x.shape[2],
                    total.shape[3])).astype(x.dtype)
