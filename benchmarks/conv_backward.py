"""Gradient time of each ResNet-50 convolution kind: XLA's (autodiff's) backward against the
hand-written one of `dakd_jax/models/conv.py`, alternating in one process, on this CPU.

  python benchmarks/conv_backward.py                       # 24 images of 192x96, all threads
  python benchmarks/conv_backward.py --threads 1 --batch 8 --height 384 --width 128

For each kind (7x7/2 stem, 1x1/1, 1x1/2 downsample, 3x3/1, 3x3/2) at the shapes the network has
at this input size, times jit(grad) of sum(conv(x, W) * r) with respect to both x and W (the
forward included, as in a training step), `--repeats` alternating rounds, and prints the median
of each side and custom/XLA. A kind whose ratio is not clearly below 1 should leave
`conv.CUSTOM_BACKWARD_KINDS`. The gradients are compared too (max relative difference).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--batch", type=int, default=24)
  parser.add_argument("--height", type=int, default=192)
  parser.add_argument("--width", type=int, default=96)
  parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
  parser.add_argument("--calls", type=int, default=3, help="timed calls per round")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="XLA CPU threads")
  return parser.parse_args()


def resnet50_kinds(height, width):
  """{name: (input [h, w, C_in], kernel size, stride, padding, C_out)} at one real layer each."""
  quarter, eighth = (height // 4, width // 4), (height // 8, width // 8)
  sixteenth = (height // 16, width // 16)
  return {
      "7x7/2 stem": ((height, width, 3), 7, 2, 3, 64),
      "1x1/1 layer1 256->64": ((*quarter, 256), 1, 1, 0, 64),
      "1x1/1 layer3 256->1024": ((*sixteenth, 256), 1, 1, 0, 1024),
      "1x1/2 layer2 downsample": ((*quarter, 256), 1, 2, 0, 512),
      "3x3/1 layer1 64": ((*quarter, 64), 3, 1, 1, 64),
      "3x3/1 layer3 256": ((*sixteenth, 256), 3, 1, 1, 256),
      "3x3/2 layer2 128": ((*quarter, 128), 3, 2, 1, 128),
      "3x3/2 layer3 256": ((*eighth, 256), 3, 2, 1, 256),
  }


def make_grads(shape, kernel, stride, padding, out_channels, batch, rng):
  """(jitted grad with XLA's backward, jitted grad with the hand-written one, arguments)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from dakd_jax.models import conv  # pylint: disable=g-import-not-at-top
  images = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(kernel, kernel, shape[2], out_channels)), jnp.float32)
  pads = ((padding, padding), (padding, padding))
  out_shape = jax.eval_shape(lambda x, w: lax.conv_general_dilated(
      x, w, (stride, stride), pads, dimension_numbers=conv.NHWC), images, weights).shape
  upstream = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

  def grad_of(setting):
    convolve = conv.conv_general_dilated_for(setting, kinds=frozenset({(kernel, stride)}))
    def loss(x, w):
      y = convolve(x, w, (stride, stride), pads, dimension_numbers=conv.NHWC)
      return jnp.sum(y * upstream)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))
  return grad_of("xla"), grad_of("custom"), (images, weights)


def time_calls(fn, args, calls):
  import jax  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - started) / calls


def max_relative_difference(expected, actual):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return max(float(np.max(np.abs(np.asarray(e) - np.asarray(a))) / np.max(np.abs(np.asarray(e))))
             for e, a in zip(expected, actual))


def main():
  args = parse_args()
  import train_step  # pylint: disable=g-import-not-at-top
  train_step.limit_xla_threads(args.threads)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  print(f"{args.batch} images of {args.height}x{args.width}, {args.threads} XLA threads, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}; median of {args.repeats} alternating "
        f"rounds of {args.calls} calls, ms per gradient (forward included)")
  print(f"{'kind':28s}{'XLA ms':>10s}{'custom ms':>11s}{'custom/XLA':>12s}{'max rel diff':>14s}")
  for name, (shape, kernel, stride, padding, out_channels) in resnet50_kinds(
      args.height, args.width).items():
    xla_grad, custom_grad, grad_args = make_grads(shape, kernel, stride, padding, out_channels,
                                                  args.batch, rng)
    difference = max_relative_difference(xla_grad(*grad_args), custom_grad(*grad_args))
    times = {"xla": [], "custom": []}
    for _ in range(args.repeats):
      times["xla"].append(time_calls(xla_grad, grad_args, args.calls))
      times["custom"].append(time_calls(custom_grad, grad_args, args.calls))
    xla_ms, custom_ms = (1e3 * statistics.median(times[k]) for k in ("xla", "custom"))
    print(f"{name:28s}{xla_ms:10.2f}{custom_ms:11.2f}{custom_ms / xla_ms:12.2f}"
          f"{difference:14.1e}")


if __name__ == "__main__":
  main()
