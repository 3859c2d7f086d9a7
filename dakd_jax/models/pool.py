"""The stem's max-pool with its backward pass written in the forms XLA:CPU runs fast.

Chosen with the convolutions' gradients (`model.conv_backward`, see conv.py): the forward pass
is always flax's `nn.max_pool` (a reduce-window max); only the gradient differs.

Why: autodiff's gradient of a max-pool is a variadic reduce-window that carries the window's
index along with its maximum (four int32 index arrays the size of the padded input, one per
dimension), then scatters; XLA:CPU runs it on its generic loop path, 0.3 s of a 3.9 s ResNet-50
training step on one core (24 images of 192x96), where PyTorch's takes milliseconds. The
hand-written gradient routes each output's gradient to the first tap of its window (row-major)
that holds the window's maximum: the forward pass finds that tap (k*k strided slices, an int8
index per output: `first_max_tap`), the backward places each tap's share back on the input
grid with interior padding (as conv.py places a strided output gradient), summed. Equal to
autodiff's wherever a window's maximum is unique. Where it is not (after a ReLU, a window of
zeros) any tap is a valid subgradient, and in the network the choice does not matter: the
ReLU's gradient is zero at every tapped zero.
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
  # The input's spatial size, kept as the shape of an empty array (residuals are arrays).
  input_size = jnp.zeros((x.shape[1], x.shape[2], 0), x.dtype)
  return pooled, (first_max_tap(x, window, strides, padding), input_size)


def _max_pool_backward(window, strides, padding, residuals, grad):
  first, input_size = residuals
  return (max_pool_input_gradient(first, grad, input_size.shape[:2], window, strides, padding),)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def _taps(padded, out_hw, window, strides):
  """One tap [n, H', W', C] per window position, row-major: that position of every output's
  window (a strided slice of the padded input)."""
  (out_h, out_w), (stride_h, stride_w) = out_hw, strides
  for row in range(window[0]):
    for col in range(window[1]):
      yield lax.slice(padded, (0, row, col, 0),
                      (padded.shape[0], row + (out_h - 1) * stride_h + 1,
                       col + (out_w - 1) * stride_w + 1, padded.shape[3]),
                      (1, stride_h, stride_w, 1))


def _pad(x, padding):
  (pad_h, pad_w) = padding
  return lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(0, 0, 0), (*pad_h, 0), (*pad_w, 0),
                                                   (0, 0, 0)])


def _output_size(size, window, stride, padding):
  return (size + padding[0] + padding[1] - window) // stride + 1


def first_max_tap(x, window, strides, padding):
  """int8 [n, H', W', C]: the row-major index of the first window position holding each
  window's maximum (strictly greater replaces, so ties keep the first).

  Found in the forward pass, every comparison on one copy of the values, and kept for the
  backward: comparing the input with the pooled output there instead would drop an output's
  gradient wherever XLA recomputed the input (fused from its BN and ReLU) with another rounding
  than the one the pooled value came from, which it does under jit. Windows of up to 127
  positions (int8).
  """
  if window[0] * window[1] > 127:
    raise ValueError(f"max-pool windows of up to 127 positions are supported, got {window}")
  out_hw = tuple(_output_size(x.shape[axis], window[axis - 1], strides[axis - 1],
                              padding[axis - 1]) for axis in (1, 2))
  best, first = None, None
  for index, tap in enumerate(_taps(_pad(x, padding), out_hw, window, strides)):
    if best is None:
      best, first = tap, jnp.zeros(tap.shape, jnp.int8)
    else:
      better = tap > best
      best = jnp.where(better, tap, best)
      first = jnp.where(better, jnp.int8(index), first)
  return first


def max_pool_input_gradient(first, grad, input_hw, window, strides, padding):
  """d loss / d x [n, H, W, C] (`input_hw` = (H, W)) from the pooled output's gradient
  [n, H', W', C]: each output's gradient goes to the window position `first` names."""
  (pad_h, pad_w), (stride_h, stride_w) = padding, strides
  padded_hw = (input_hw[0] + pad_h[0] + pad_h[1], input_hw[1] + pad_w[0] + pad_w[1])
  out_h, out_w = grad.shape[1:3]
  zero = jnp.zeros((), grad.dtype)
  total = None
  for index in range(window[0] * window[1]):
    row, col = divmod(index, window[1])
    routed = jnp.where(first == index, grad, zero)
    # Back onto the padded input grid: tap (row, col) of output i sits at row + i * stride.
    placed = lax.pad(routed, zero, [
        (0, 0, 0),
        (row, padded_hw[0] - row - (out_h - 1) * stride_h - 1, stride_h - 1),
        (col, padded_hw[1] - col - (out_w - 1) * stride_w - 1, stride_w - 1),
        (0, 0, 0)])
    total = placed if total is None else total + placed
  return lax.slice(total, (0, pad_h[0], pad_w[0], 0),
                   (total.shape[0], pad_h[0] + input_hw[0], pad_w[0] + input_hw[1],
                    total.shape[3]))
