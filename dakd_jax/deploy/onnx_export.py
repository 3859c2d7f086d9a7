"""ONNX conversion of the extractor with jax2onnx, from a jaxpr with max-pooling rewritten.

Called by `dakd_jax.deploy.export` between `extractor_function` and the file on disk. jax2onnx
gets a jaxpr rather than the Flax module, for two reasons found with jax2onnx 0.13.0 (its code
for both is the same up to 0.17.1):
- while it traces a function it replaces `flax.linen.max_pool` with a version that rejects the
  stem's positional arguments and explicit padding;
- it lowers `lax.reduce_window_max` on an NHWC array to a MaxPool with a 4-D kernel, which
  onnxruntime refuses ("Unsupported pooling size").
So the extractor is traced here, and the jaxpr is evaluated for jax2onnx with every
`reduce_window_max` computed as the maximum of strided slices of the padded input, which is exact
(a maximum does not round). The StableHLO file keeps the untouched function.

jax2onnx 0.13.1 and later pin orbax-checkpoint below 0.11.37, under this project's
orbax-checkpoint>=0.12.8, so pip resolves the `export` extra to jax2onnx 0.13.0.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from typing import Callable

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

from dakd_jax.deploy import extractor as extractor_lib
from dakd_jax.deploy import packages as packages_lib

ONNX_OPSET = 23


def convert_to_onnx(extract: Callable, specs) -> bytes:
  """The serialised ONNX model (opset 23, weights inline) of `extract` for `specs`.

  Inputs are named `extractor.INPUT_NAMES`, the output `extractor.OUTPUT_NAME`; symbolic
  dimensions of `specs` (the batch) stay symbolic. Raises ExportError if the extra is missing.
  """
  jax2onnx = packages_lib.check_export_packages()["jax2onnx"]
  closed = jax.make_jaxpr(extract)(*specs)

  def rewritten(*args):
    return evaluate_for_onnx(closed.jaxpr, closed.consts, *args)[0]

  # jax2onnx logs a traceback for each optional plugin it cannot import (dm_pix with this jax),
  # its plugins use deprecated jax names, and onnx_ir warns about each untyped shape constant;
  # none of it affects the graph.
  with _quiet_converter(("jax2onnx", "onnx_ir")):
    proto = jax2onnx.to_onnx(
        rewritten, list(specs), model_name="dakd_jax_extractor", opset=ONNX_OPSET,
        input_names=list(extractor_lib.INPUT_NAMES), output_names=[extractor_lib.OUTPUT_NAME])
  return proto.SerializeToString()


@contextlib.contextmanager
def _quiet_converter(logger_names):
  loggers = [logging.getLogger(name) for name in logger_names]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def evaluate_for_onnx(jaxpr, consts, *args) -> list:
  """Evaluates `jaxpr` like `jax.extend.core.jaxpr_as_fun`, but with every `reduce_window_max`
  (also inside jit and custom_jvp calls, which are inlined) computed by `max_of_slices`."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))

  def read(var):
    return var.val if isinstance(var, jax_core.Literal) else env[var]

  for eqn in jaxpr.eqns:
    values = [read(var) for var in eqn.invars]
    inner = _inlined_jaxpr(eqn)
    if eqn.primitive.name == "reduce_window_max":
      outputs = [max_of_slices(values[0], **eqn.params)]
    elif inner is not None:
      outputs = evaluate_for_onnx(inner.jaxpr, inner.consts, *values)
    else:
      outputs = eqn.primitive.bind(*values, **eqn.params)
      outputs = outputs if eqn.primitive.multiple_results else [outputs]
    env.update(zip(eqn.outvars, outputs))
  return [read(var) for var in jaxpr.outvars]


def _inlined_jaxpr(eqn):
  """The closed jaxpr of a jit or custom_jvp call (evaluated inline), else None."""
  if eqn.primitive.name in ("jit", "pjit"):
    return eqn.params["jaxpr"]
  if eqn.primitive.name == "custom_jvp_call":
    return eqn.params["call_jaxpr"]
  return None


def max_of_slices(x, *, window_dimensions, window_strides, padding, base_dilation,
                  window_dilation):
  """`lax.reduce_window_max` as the elementwise maximum of strided slices of the padded input.

  Takes the primitive's parameters. Padding uses -inf, as `lax.reduce_window_max` does for
  floating inputs. Raises ExportError for dilated windows, which the network does not use.
  """
  if any(d != 1 for d in (*base_dilation, *window_dilation)):
    raise packages_lib.ExportError(
        f"max pooling with dilation {base_dilation}/{window_dilation} cannot be exported; only "
        "undilated windows are supported")
  x = _pad_with_minus_infinity(x, padding)
  sizes = [(n - w) // s + 1 for n, w, s in zip(x.shape, window_dimensions, window_strides)]
  result = None
  for offsets in itertools.product(*(range(w) for w in window_dimensions)):
    # lax.slice, not x[::s]: NumPy-style strided indexing of a symbolic batch becomes a gather.
    limits = [o + (n - 1) * s + 1 for o, n, s in zip(offsets, sizes, window_strides)]
    window = jax.lax.slice(x, offsets, limits, window_strides)
    result = window if result is None else jnp.maximum(result, window)
  return result


def _pad_with_minus_infinity(x, padding):
  """Pads each axis of x by (low, high) entries of -inf, as `reduce_window_max` pads.

  Concatenates blocks of -inf rather than calling `lax.pad`: jax2onnx 0.13.0 cannot lower
  `lax.pad` of an array with a symbolic batch dimension.
  """
  for axis, (low, high) in enumerate(padding):
    if low or high:
      low_block, high_block = (
          jnp.full_like(jax.lax.slice_in_dim(x, 0, width, axis=axis), -jnp.inf)
          for width in (low, high))
      x = jnp.concatenate([low_block, x, high_block], axis=axis)
  return x
