"""A 2-D convolution whose backward pass is written in the forms XLA:CPU runs fast.

Part of the model (`resnet.py`): every `nn.Conv` of the network is given the convolution that
`conv_general_dilated_for(config model.conv_backward)` returns. The forward pass is always
`lax.conv_general_dilated`; only the gradient differs, and it equals autodiff's.

Why: on CPU the forward convolutions run on XLA's fast kernels (oneDNN, XNNPACK/YNNPACK) and are
on par with PyTorch, but the convolutions that autodiff emits for the backward pass are exactly
the ones those kernels decline (a reversed kernel, lhs dilation for a strided convolution,
batch groups for the weight gradient), so XLA:CPU runs them on a slow generic path and a
ResNet-50 training step took 2.4x PyTorch's time. The hand-written VJP (`conv2d_nhwc`) states the
same gradients with operations those kernels accept:

  - 1x1 convolutions (the bottleneck's conv1/conv3, the downsample projection, the non-local
    block's): both gradients are matrix products, `grad @ W^T` for the input (zero-inserted back
    onto the strided grid for stride 2) and `x_s^T @ grad` for the kernel, x_s the strided input
    (as `(grad^T @ x_s)^T` where grad has fewer channels: see `kernel_gradient`);
  - kxk convolutions: the input gradient is a plain stride-1 VALID forward convolution of the
    output gradient, zero-inserted for stride s (interior padding s-1) and padded by k-1-p low,
    with the spatially flipped kernel whose in/out channels are swapped; the kernel gradient
    stacks the k*k shifted (strided) slices of the padded input and contracts them with the
    output gradient in one matrix product.

`CUSTOM_BACKWARD_KINDS` lists the (kernel size, stride) kinds whose hand-written gradient pays on
this CPU; the others keep autodiff's gradient. Measured per kind with
`benchmarks/conv_backward.py` (24 images of 192x96, one thread, 2 shared cores, hand-written
time / XLA's, both gradients): 1x1/1 0.57-0.60, 1x1/2 downsample 0.37 - kept; 3x3/1 1.06-2.86,
3x3/2 0.87-1.66, 7x7/2 stem 1.83 - left to XLA. XLA:CPU (jax 0.10) already runs the kxk input
gradient about as fast as the hand-written convolution, and its weight gradient is 2-4x faster
than the stacked slices and matmul (the k*k-times-larger patch matrix is memory-bound), which is
what the earlier measurement recorded in DEVELOPERS.md found too. The kxk code stays, tested
equal to autodiff's, so a backend or size where it pays can list its kind.
On GPUs and TPUs cuDNN and the TPU compiler run autodiff's convolutions well, so the default
setting "auto" uses the hand-written backward only on the CPU backend. The stem's max-pool and
the unmasked training batch norms follow the same setting (`pool.py`: autodiff's max-pool
gradient is a slow index-carrying reduce-window on XLA:CPU; `batch_norm.normalize_over_batch`:
autodiff's BN keeps a centred copy of every BN input).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# config model.conv_backward: "auto" = the hand-written backward on the CPU backend, XLA's
# (autodiff's) elsewhere; "custom" = hand-written everywhere; "xla" = autodiff's everywhere.
CONV_BACKWARDS = ("auto", "custom", "xla")
# (square kernel size, stride) of the convolutions whose hand-written backward pays on XLA:CPU
# (benchmarks/conv_backward.py, ResNet-50 shapes): the 1x1 ones; kxk kinds keep autodiff's gradient.
CUSTOM_BACKWARD_KINDS = frozenset({(1, 1), (1, 2)})
NHWC = ("NHWC", "HWIO", "NHWC")


def resolve_conv_backward(setting: str, backend: str | None = None) -> str:
  """'custom' or 'xla' for a model.conv_backward setting on `backend` (default: JAX's default
  backend). Raises ValueError for a setting outside CONV_BACKWARDS."""
  if setting not in CONV_BACKWARDS:
    raise ValueError(f"model conv_backward must be one of {CONV_BACKWARDS}, got {setting!r}")
  if setting != "auto":
    return setting
  return "custom" if (backend or jax.default_backend()) == "cpu" else "xla"


def conv_general_dilated_for(setting: str, backend: str | None = None,
                             kinds: frozenset | None = None) -> Callable:
  """The convolution for `nn.Conv(conv_general_dilated=...)`: `lax.conv_general_dilated` itself
  when the setting resolves to 'xla', else a drop-in with the same signature whose gradient is
  hand-written for the (kernel size, stride) `kinds` (default CUSTOM_BACKWARD_KINDS). Parameters
  are created by `nn.Conv` either way, so the variables tree does not depend on the setting."""
  if resolve_conv_backward(setting, backend) == "xla":
    return lax.conv_general_dilated
  return _fast_backward_for(CUSTOM_BACKWARD_KINDS if kinds is None else frozenset(kinds))


@functools.lru_cache(maxsize=None)
def _fast_backward_for(kinds: frozenset) -> Callable:
  # One function object per kinds: modules holding it hash and compare equal across calls.
  return functools.partial(conv_general_dilated_fast_backward, kinds=kinds)


def conv_kind(kernel_shape: Sequence[int], strides: Sequence[int]) -> tuple[int, int] | None:
  """(k, s) of a square kernel with equal strides, else None (kept on autodiff's gradient)."""
  (height, width), (stride_h, stride_w) = kernel_shape[:2], strides
  return (height, stride_h) if height == width and stride_h == stride_w else None


def conv_general_dilated_fast_backward(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                       rhs_dilation=None, dimension_numbers=None,
                                       feature_group_count=1, batch_group_count=1,
                                       precision=None, preferred_element_type=None,
                                       kinds: frozenset = CUSTOM_BACKWARD_KINDS):
  """`lax.conv_general_dilated` (same arguments and result) with the hand-written gradient for
  2-D NHWC/HWIO convolutions of the `kinds`; any other convolution (dilated, grouped, another
  layout or kind) is passed to `lax.conv_general_dilated` unchanged."""
  plain = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  if lhs.ndim != 4 or preferred_element_type is not None:
    return plain()
  undilated = all(d == 1 for d in (*(lhs_dilation or (1, 1)), *(rhs_dilation or (1, 1))))
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
  if (not undilated or feature_group_count != 1 or batch_group_count != 1
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != expected
      or conv_kind(rhs.shape, window_strides) not in kinds):
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(low), int(high)) for low, high in padding)
  return conv2d_nhwc(lhs, rhs, tuple(window_strides), pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_nhwc(images, kernel, strides, padding, precision=None):
  """Convolution of images [n, H, W, C_in] with kernel [kh, kw, C_in, C_out] (HWIO), strides
  (sh, sw), padding ((low, high), (low, high)) -> [n, H', W', C_out]; the gradient is the
  hand-written one of the module docstring."""
  return lax.conv_general_dilated(images, kernel, strides, padding, dimension_numbers=NHWC,
                                  precision=precision)


def _conv2d_forward(images, kernel, strides, padding, precision):
  return conv2d_nhwc(images, kernel, strides, padding, precision), (images, kernel)


def _conv2d_backward(strides, padding, precision, residuals, grad):
  images, kernel = residuals
  grad_images = input_gradient(grad, kernel, images.shape[1:3], strides, padding, precision)
  grad_kernel = kernel_gradient(images, grad, kernel.shape[:2], strides, padding, precision)
  return grad_images.astype(images.dtype), grad_kernel.astype(kernel.dtype)


conv2d_nhwc.defvjp(_conv2d_forward, _conv2d_backward)


def _accumulation_dtype(dtype):
  """Products are summed in float32 (float64 for a float64 model), then rounded to `dtype`."""
  return jnp.promote_types(dtype, jnp.float32)


def _spread_config(grad_hw, input_hw, kernel_hw, strides, padding):
  """lax.pad configuration that places the output gradient on the stride-s input grid (interior
  padding s-1) with k-1-low rows before it and enough after it that a VALID k-tap convolution
  returns exactly the input size: out = in + low + high - k + 1 rows before, so
  high' = in + low - (out-1) s - 1. Negative values crop (a row no output reads)."""
  config = [(0, 0, 0)]
  for out, size, k, s, (low, _) in zip(grad_hw, input_hw, kernel_hw, strides, padding):
    config.append((k - 1 - low, size + low - (out - 1) * s - 1, s - 1))
  return config + [(0, 0, 0)]


def input_gradient(grad, kernel, input_hw, strides, padding, precision=None):
  """d loss / d images [n, H, W, C_in] from grad [n, H', W', C_out] (see the module docstring):
  a matrix product for 1x1 kernels, else a stride-1 forward convolution of the zero-inserted
  gradient with the flipped, in/out-swapped kernel."""
  config = _spread_config(grad.shape[1:3], input_hw, kernel.shape[:2], strides, padding)
  zero = jnp.zeros((), grad.dtype)
  if kernel.shape[:2] == (1, 1):
    # Spreading commutes with the per-pixel product; do the product on the smaller grid.
    product = jnp.dot(grad, kernel[0, 0].T, precision=precision,
                      preferred_element_type=_accumulation_dtype(grad.dtype))
    return lax.pad(product.astype(grad.dtype), zero, config)
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  return lax.conv_general_dilated(lax.pad(grad, zero, config), flipped, (1, 1), "VALID",
                                  dimension_numbers=NHWC, precision=precision)


def kernel_gradient(images, grad, kernel_hw, strides, padding, precision=None):
  """d loss / d kernel [kh, kw, C_in, C_out]: the kh*kw shifted, strided slices of the padded
  images stacked on the channel axis [n, H', W', kh*kw*C_in], contracted with grad
  [n, H', W', C_out] over (n, H', W') in one matrix product."""
  (kernel_h, kernel_w), (stride_h, stride_w) = kernel_hw, strides
  out_h, out_w = grad.shape[1:3]
  zero = jnp.zeros((), images.dtype)
  padded = lax.pad(images, zero, [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)])
  taps = [lax.slice(padded, (0, row, col, 0),
                    (padded.shape[0], row + (out_h - 1) * stride_h + 1,
                     col + (out_w - 1) * stride_w + 1, padded.shape[3]),
                    (1, stride_h, stride_w, 1))
          for row in range(kernel_h) for col in range(kernel_w)]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  # Contracted over pixels, the left operand is transposed. With the patches on the left XLA:CPU
  # writes a transposed copy of them for its YNNPACK matmul, the patches' producer (a block's BN,
  # residual and ReLU) fused into the copy: a fifth of a ResNet-50 step. With the output gradient
  # on the left, where it has fewer channels, XLA runs an Eigen matmul that reads it transposed,
  # no copy: about 0.85x the step's time. Eigen has no bfloat16 -> float32 matmul, so bfloat16
  # keeps YNNPACK's.
  contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
  accumulate = _accumulation_dtype(grad.dtype)
  if grad.shape[3] < patches.shape[3] and grad.dtype != jnp.bfloat16:
    product = lax.dot_general(grad, patches, contract, precision=precision,
                              preferred_element_type=accumulate).T
  else:
    product = lax.dot_general(patches, grad, contract, precision=precision,
                              preferred_element_type=accumulate)
  return product.reshape(kernel_h, kernel_w, images.shape[3], grad.shape[3])
