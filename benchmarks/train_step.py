"""Steps/s and images/s of the compiled teacher and student steps, on random batches.

  python benchmarks/train_step.py                       # demo size (CPU)
  python benchmarks/train_step.py --config=configs/sysu.py --dtype=bfloat16   # accelerator
  python benchmarks/train_step.py --compare             # also the student's alternatives
  python benchmarks/train_step.py --conv-backwards xla,custom --threads 1   # conv gradients

The batches are random uint8 images of the config's size, so only the step (augmentation,
forward, loss, backward, update) is measured, not the input pipeline (see input_pipeline.py).
The first call (compilation) is reported separately. With --compare the student step is also
timed with the released two calls instead of one grouped call (distill.student_forward) and
with the released double BN update (distill.double_bn_update), alternating the variants
--repeats times in this process and printing the median of each, side by side. With
--conv-backwards the teacher and the student steps are timed the same way once per
model.conv_backward setting ("xla": autodiff's convolution gradients, "custom": the
hand-written ones of dakd_jax/models/conv.py).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dakd_jax import builders  # noqa: E402
from dakd_jax import config as config_lib  # noqa: E402
from dakd_jax import sharding as sharding_lib  # noqa: E402
from dakd_jax.losses import memory as memory_lib  # noqa: E402
from dakd_jax.models import resnet  # noqa: E402
from dakd_jax.train import loop  # noqa: E402
from dakd_jax.train import state as state_lib  # noqa: E402
from dakd_jax.train import steps as steps_lib  # noqa: E402

NUM_CLASSES = 395  # SYSU-MM01 training identities; only the memory size depends on it.


def limit_xla_threads(threads):
  """Must run before the first JAX computation: XLA reads the flags when its backend starts."""
  flags = (f"--xla_cpu_multi_thread_eigen={str(threads > 1).lower()} "
           f"intra_op_parallelism_threads={threads}")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def pairs_per_step(config) -> int:
  """n: visible/infrared pairs in one step's batch."""
  return config.data.ids_per_batch * config.data.images_per_id


def random_batch(config, rng):
  """A host batch of random uint8 images: {'visible', 'infrared': [n,H,W,3], 'labels': [n]}."""
  n = pairs_per_step(config)
  shape = (n, config.data.image_height, config.data.image_width, 3)
  labels = np.repeat(np.arange(config.data.ids_per_batch), config.data.images_per_id)
  return {"visible": rng.integers(0, 256, shape, dtype=np.uint8),
          "infrared": rng.integers(0, 256, shape, dtype=np.uint8),
          "labels": labels.astype(np.int32)}


def unit_rows(rng, shape):
  return memory_lib.unit_rows(jnp.asarray(rng.normal(size=shape), jnp.float32))


def make_teacher_runner(config, model, variables, mesh, rng):
  """(jitted teacher step, extra arguments before the batch (none), a fresh replicated state)."""
  dim = resnet.output_features(config.model.depth, config.model.width)
  tx = builders.make_teacher_optimizer(config, steps_per_epoch=100)
  memories = memory_lib.init_memories(*(unit_rows(rng, (NUM_CLASSES, dim)) for _ in range(3)))
  state = state_lib.create_replicated_state(variables, tx, jax.random.key(1), mesh, memories)
  step = loop.jit_step(steps_lib.make_teacher_step(
      model, tx, builders.teacher_settings(config), builders.augment_views(config, "teacher"),
      hard_momentum=config.teacher.hard_momentum, mean_momentum=config.teacher.mean_momentum),
      mesh)
  return step, (), state


def make_student_runner(config, model, variables, mesh, rng, **step_options):
  """(jitted student step, (frozen teacher,), a fresh replicated state); step_options override
  the config's double_bn_update and student_forward."""
  dim = resnet.output_features(config.model.depth, config.model.width)
  teacher = sharding_lib.replicate(steps_lib.FrozenTeacher(
      variables, unit_rows(rng, (NUM_CLASSES, dim)), unit_rows(rng, (NUM_CLASSES, dim))), mesh)
  tx = builders.make_student_optimizer(config)
  state = state_lib.create_replicated_state(variables, tx, jax.random.key(2), mesh)
  options = {"double_bn_update": config.distill.double_bn_update,
             "student_forward": config.distill.student_forward, **step_options}
  step = loop.jit_step(steps_lib.make_student_step(
      model, tx, builders.distill_settings(config), builders.augment_views(config, "student"),
      **options), mesh, num_extra=1)
  return step, (teacher,), state


def time_steps(step_fn, extra, state, batches, mesh):
  """(seconds of the first call, mean wall seconds and mean CPU seconds of this process per
  step over batches[1:], final state). On a shared machine the CPU time (all threads) is the
  steadier measure of the work; the wall time is what a user waits."""
  started = time.perf_counter()
  state, metrics = step_fn(state, *extra, sharding_lib.host_to_global(batches[0], mesh))
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - started
  global_batches = [sharding_lib.host_to_global(b, mesh) for b in batches[1:]]
  started, cpu_started = time.perf_counter(), time.process_time()
  for batch in global_batches:
    state, metrics = step_fn(state, *extra, batch)
  jax.block_until_ready(metrics)
  steps = len(global_batches)
  return (first_s, (time.perf_counter() - started) / steps,
          (time.process_time() - cpu_started) / steps, state)


def alternate(runners, batches, mesh, repeats):
  """Times each (step, extra, state) of `runners` in turn, `repeats` rounds; returns
  {name: (median wall s/step, median CPU s/step)}."""
  wall = {name: [] for name in runners}
  cpu = {name: [] for name in runners}
  states = {name: runner[2] for name, runner in runners.items()}
  for _ in range(repeats):
    for name, (step, extra, _) in runners.items():
      _, wall_s, cpu_s, states[name] = time_steps(step, extra, states[name], batches, mesh)
      wall[name].append(wall_s)
      cpu[name].append(cpu_s)
  return {name: (statistics.median(wall[name]), statistics.median(cpu[name]))
          for name in runners}


def compare_students(config, model, variables, mesh, rng, batches, repeats):
  """Times the student step variants alternately, `repeats` rounds; prints medians."""
  variants = {
      "grouped (one call)": {"student_forward": "grouped", "double_bn_update": False},
      "two_calls (released)": {"student_forward": "two_calls", "double_bn_update": False},
      "grouped + double BN update": {"student_forward": "grouped", "double_bn_update": True},
      "two_calls + double BN update": {"student_forward": "two_calls",
                                       "double_bn_update": True},
  }
  runners = {name: make_student_runner(config, model, variables, mesh, rng, **options)
             for name, options in variants.items()}
  medians = alternate(runners, batches, mesh, repeats)
  n = pairs_per_step(config)
  print(f"student variants, median of {repeats} alternating rounds of {len(batches) - 1} steps "
        "(wall ms/step, CPU ms/step of this process):")
  base = medians["grouped (one call)"][1]
  for name in variants:
    wall_ms, cpu_ms = (1e3 * t for t in medians[name])
    print(f"  {name:30s} wall {wall_ms:7.1f}  CPU {cpu_ms:7.1f}  {2 * n / wall_ms * 1e3:6.0f} "
          f"images/s  CPU x{cpu_ms / 1e3 / base:.2f} of grouped")


def compare_conv_backwards(config, settings, variables, mesh, rng, batches, repeats):
  """Times the teacher and the student step once per model.conv_backward setting, alternating
  `repeats` rounds (after one compiling call each); prints medians and the ratio to the first."""
  runners = {}
  for setting in settings:
    model = resnet.model_from_settings({**config.model.to_dict(), "conv_backward": setting})
    runners[f"teacher {setting}"] = make_teacher_runner(config, model, variables, mesh, rng)
    runners[f"student {setting}"] = make_student_runner(config, model, variables, mesh, rng)
  for name, (step, extra, state) in runners.items():
    _, _, _, state = time_steps(step, extra, state, batches[:2], mesh)  # compiles
    runners[name] = (step, extra, state)
  medians = alternate(runners, batches, mesh, repeats)
  print(f"model.conv_backward, median of {repeats} alternating rounds of {len(batches) - 1} "
        f"steps (wall s/step, CPU s/step of this process, wall ratio to {settings[0]}):")
  for name, (wall_s, cpu_s) in medians.items():
    base = medians[name.split()[0] + " " + settings[0]][0]
    print(f"  {name:22s} wall {wall_s:7.3f}  CPU {cpu_s:7.3f}  x{wall_s / base:.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--dtype", default=None, help="model.compute_dtype override")
  parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
  parser.add_argument("--compare", action="store_true",
                      help="also time the student's released alternatives, alternating")
  parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (--compare)")
  parser.add_argument("--conv-backwards", default="",
                      help="model.conv_backward settings to time side by side, e.g. xla,custom")
  parser.add_argument("--threads", type=int, default=0, help="XLA CPU threads (0: all)")
  parser.add_argument("--size", default="", help="HxW image size override, e.g. 384x128")
  parser.add_argument("--pairs", type=int, default=0,
                      help="pairs per step override (ids x 4 images per id; 0: the config's)")
  args = parser.parse_args()
  if args.threads:
    limit_xla_threads(args.threads)
  overrides = {"model.compute_dtype": args.dtype} if args.dtype else {}
  if args.size:
    height, width = (int(v) for v in args.size.split("x"))
    overrides.update({"data.image_height": height, "data.image_width": width})
  if args.pairs:
    overrides.update({"data.ids_per_batch": args.pairs // 4, "data.images_per_id": 4})
  config = config_lib.load_config(args.config, overrides)
  mesh = sharding_lib.make_mesh()
  model = builders.model_from_config(config)
  rng = np.random.default_rng(0)
  batches = [random_batch(config, rng) for _ in range(args.steps + 1)]
  variables = builders.init_model_variables(config, model, jax.random.key(0))
  n = pairs_per_step(config)
  print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}, config {args.config}, "
        f"ResNet-{config.model.depth} width {config.model.width}, "
        f"{config.data.image_height}x{config.data.image_width}, {config.model.compute_dtype}, "
        f"{n} pairs per step, remat {config.model.remat or 'none'}, student "
        f"{config.distill.student_forward}, double BN update {config.distill.double_bn_update}"
        f", {args.threads or os.cpu_count()} threads")
  if args.conv_backwards:
    compare_conv_backwards(config, args.conv_backwards.split(","), variables, mesh, rng,
                           batches, args.repeats)
    return

  step, extra, state = make_teacher_runner(config, model, variables, mesh, rng)
  compile_s, step_s, cpu_s, _ = time_steps(step, extra, state, batches, mesh)
  print(f"teacher: compile+first {compile_s:.1f} s | {1 / step_s:.2f} steps/s | "
        f"{3 * n / step_s:.0f} images/s through the network ({3 * n} per step: v, i, a) | "
        f"CPU {cpu_s * 1e3:.0f} ms/step")

  step, extra, state = make_student_runner(config, model, variables, mesh, rng)
  compile_s, step_s, cpu_s, _ = time_steps(step, extra, state, batches, mesh)
  print(f"student: compile+first {compile_s:.1f} s | {1 / step_s:.2f} steps/s | "
        f"{2 * n / step_s:.0f} images/s ({2 * n} per step, plus the frozen teacher's forward) | "
        f"CPU {cpu_s * 1e3:.0f} ms/step")
  if args.compare:
    compare_students(config, model, variables, mesh, rng, batches, args.repeats)


if __name__ == "__main__":
  main()
