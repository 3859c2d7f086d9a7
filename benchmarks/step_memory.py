"""What the teacher step's XLA temporary buffer holds, and what model.remat changes.

  python benchmarks/step_memory.py            # ResNet-50 width 64, 8 pairs of 192x96 (24 images)
  python benchmarks/step_memory.py --height 384 --width 128 --pairs 32 --dtype bfloat16
  python benchmarks/step_memory.py --remats "" --conv-backward xla    # then custom: before/after

Two views of the same question, for each model.remat setting in --remats:
  1. XLA's memory analysis of the compiled teacher step (the real step of train_step.py:
     augmentation, three views through the network, losses, backward, update): arguments,
     outputs, temporaries, the bytes of outputs written over donated arguments, and the
     convolutions in the compiled program (a rematerialisation the compiler kept adds the
     recomputed part's forward convolutions; XLA:CPU folds them back, so there the count and
     the memory do not change);
  2. the activations the backward pass keeps (jax.ad_checkpoint.print_saved_residuals of the
     network's training forward on the step's 3n images), summed by resolution (the stem at
     H/2, the max-pool and layer1 at H/4, layer2 at H/8, layer3 and layer4 at H/16 with the
     default last stride 1) and by the operation that produced them.
The residuals are what the forward pass hands to the backward pass before XLA's fusion; the
temporaries are what the compiled step really plans. Rematerialisation lowers the first; it
lowers the second only where the compiler keeps the recomputation (see the convolution count).
"""
import argparse
import collections
import contextlib
import io
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.ad_checkpoint  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step  # noqa: E402
from dakd_jax import builders  # noqa: E402
from dakd_jax import config as config_lib  # noqa: E402
from dakd_jax import sharding as sharding_lib  # noqa: E402

GIB = 1024 ** 3
DTYPE_BYTES = {"f64": 8, "f32": 4, "s32": 4, "i32": 4, "u32": 4, "bf16": 2, "f16": 2, "u8": 1,
               "s8": 1, "i8": 1, "bool": 1, "pred": 1}
RESIDUAL_LINE = re.compile(r"^(\w+)\[([\d,]*)\]\s+(.*)$")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/sysu.py")
  parser.add_argument("--height", type=int, default=192)
  parser.add_argument("--width", type=int, default=96)
  parser.add_argument("--pairs", type=int, default=8, help="visible/infrared pairs per step (n)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remats", default=";stem;non_local;stem,non_local",
                      help="model.remat settings to compare, ';' between them")
  parser.add_argument("--top", type=int, default=6, help="producing operations listed")
  parser.add_argument("--conv-backward", default="auto",
                      help="model.conv_backward (auto | custom | xla): whose conv gradients")
  parser.add_argument("--depth", type=int, default=None,
                      help="model.depth (10 | 18 | 34 | 50); default: the config's")
  return parser.parse_args(argv)


def sized_config(args, remat):
  """The config at the requested size: n = ids x images per id (4 per id where n allows)."""
  if args.pairs < 4 or args.pairs % 2:
    raise SystemExit(f"--pairs must be even and at least 4, got {args.pairs}")
  per_id = 4 if args.pairs % 4 == 0 and args.pairs >= 8 else 2
  overrides = {"data.image_height": args.height, "data.image_width": args.width,
               "data.ids_per_batch": args.pairs // per_id, "data.images_per_id": per_id,
               "model.compute_dtype": args.dtype, "model.remat": remat,
               "model.conv_backward": args.conv_backward}
  if args.depth is not None:
    overrides["model.depth"] = args.depth
  return config_lib.load_config(args.config, overrides)


def residual_bytes(line: str) -> tuple[int, tuple[int, ...], str] | None:
  """(bytes, shape, what produced it) of one print_saved_residuals line; None for others."""
  match = RESIDUAL_LINE.match(line.strip())
  if not match:
    return None
  dtype, dims, source = match.groups()
  shape = tuple(int(d) for d in dims.split(",") if d)
  return int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES.get(dtype, 4), shape, source


def producer(source: str) -> str:
  """'conv_general_dilated', 'sub', ... for activations; 'argument' for parameters."""
  if source.startswith("from the argument"):
    return "argument (parameters, images)"
  match = re.match(r"output of (\w+)", source)
  return match.group(1) if match else source.split(" from ")[0]


def resolution_label(shape, height: int) -> str:
  """The network part an activation of `shape` [n, h, w, c] belongs to, from h (a batch norm's
  grouped view [groups, n / groups, h, w, c] counts as [n, h, w, c])."""
  if len(shape) == 5:
    shape = (shape[0] * shape[1],) + tuple(shape[2:])
  if len(shape) != 4 or shape[0] == 1:  # [1, 1, 1, C]: a batch statistic, broadcastable
    return "vectors (pooling, BNNeck, BN statistics)"
  if shape[1] == 1:
    return "per-image scalars (non-local, GeM)"
  factor = height // shape[1] if shape[1] else 0
  return {1: "input (H)", 2: "stem (H/2)", 4: "max-pool + layer1 (H/4)", 8: "layer2 (H/8)",
          16: "layer3 + layer4 (H/16)"}.get(factor, f"H/{factor}")


def saved_residuals(config, model, variables, images, modality):
  """[(bytes, shape, producer)] the network's training forward keeps for its backward pass."""
  def forward(params, images):
    outputs, _ = model.apply({**variables, "params": params}, images, modality, train=True,
                             mutable=["batch_stats"])
    return outputs["features"].sum()

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(forward, variables["params"], images)
  parsed = (residual_bytes(line) for line in printed.getvalue().splitlines())
  return [(size, shape, producer(source)) for size, shape, source in filter(None, parsed)]


def step_memory(config, model, variables, mesh, rng):
  """(XLA's memory analysis of the compiled teacher step, convolutions in its compiled HLO).

  The convolution count shows whether the backend kept a rematerialisation: recomputing a part
  adds its forward convolutions to the backward pass, unless the compiler folds them back.
  """
  jitted, extra, state = train_step.make_teacher_runner(config, model, variables, mesh, rng)
  batch = sharding_lib.host_to_global(train_step.random_batch(config, rng), mesh)
  compiled = jitted.lower(state, *extra, batch).compile()
  return compiled.memory_analysis(), compiled.as_text().count(" convolution(")


def report(args, remat: tuple[str, ...], mesh):
  config = sized_config(args, remat)
  model = builders.model_from_config(config)
  variables = builders.init_model_variables(config, model, jax.random.key(0))
  rng = np.random.default_rng(0)
  memory, convolutions = step_memory(config, model, variables, mesh, rng)
  images = 3 * args.pairs
  batch = jnp.asarray(rng.normal(size=(images, args.height, args.width, 3)), jnp.float32)
  modality = jnp.asarray(np.arange(images) % 2, jnp.int32)
  residuals = saved_residuals(config, model, variables, batch, modality)
  activations = [r for r in residuals if r[2] != "argument (parameters, images)"]
  total = sum(size for size, _, _ in activations)
  name = ",".join(remat) or "none"
  print(f"\nmodel.remat = {name}: teacher step (XLA) temporaries "
        f"{memory.temp_size_in_bytes / GIB:.2f} GiB, arguments "
        f"{memory.argument_size_in_bytes / GIB:.2f}, outputs {memory.output_size_in_bytes / GIB:.2f}"
        f", donated {memory.alias_size_in_bytes / GIB:.2f}; {convolutions} convolutions compiled")
  print(f"  activations kept for the backward pass ({images} images): {total / GIB:.2f} GiB in "
        f"{len(activations)} arrays")
  by_part = collections.Counter()
  by_producer = collections.Counter()
  for size, shape, made_by in activations:
    by_part[resolution_label(shape, args.height)] += size
    by_producer[made_by] += size
  for part, size in sorted(by_part.items(), key=lambda item: -item[1]):
    print(f"    {part:42s} {size / GIB:6.3f} GiB  {100 * size / max(total, 1):5.1f}%")
  print("  by producing operation:")
  for made_by, size in by_producer.most_common(args.top):
    print(f"    {made_by:42s} {size / GIB:6.3f} GiB  {100 * size / max(total, 1):5.1f}%")
  return memory.temp_size_in_bytes, by_part, convolutions


def main(argv=None):
  """Prints the report; returns {remat setting: (XLA temporary bytes, {part: kept bytes},
  convolutions in the compiled step)}."""
  args = parse_args(argv)
  mesh = sharding_lib.make_mesh()
  print(f"device {jax.devices()[0].device_kind}, {args.config}, {args.pairs} pairs of "
        f"{args.height}x{args.width} ({3 * args.pairs} images through the teacher), {args.dtype}, "
        f"model.conv_backward {args.conv_backward}")
  results = {}
  for setting in args.remats.split(";"):
    remat = tuple(part for part in setting.split(",") if part)
    results[",".join(remat) or "none"] = report(args, remat, mesh)
  base_temp, base_parts, _ = results[next(iter(results))]
  base_kept = sum(base_parts.values())
  print("\nsummary (ratios to the first setting): remat | XLA temporaries | kept activations | "
        "compiled convolutions")
  for name, (temp, parts, convolutions) in results.items():
    kept = sum(parts.values())
    print(f"  {name:18s} {temp / GIB:6.2f} GiB x{temp / base_temp:.2f} | "
          f"{kept / GIB:6.2f} GiB x{kept / max(base_kept, 1):.2f} | {convolutions}")
  return results


if __name__ == "__main__":
  main()
