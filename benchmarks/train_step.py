"""Steps/s and images/s of the compiled teacher and student steps, on random batches.

  python benchmarks/train_step.py                       # demo size (CPU)
  python benchmarks/train_step.py --config=configs/sysu.py --dtype=bfloat16   # accelerator

The batches are random uint8 images of the config's size, so only the step (augmentation,
forward, loss, backward, update) is measured, not the input pipeline (see input_pipeline.py).
The first call (compilation) is reported separately.
"""
import argparse
import os
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


def random_batch(config, rng):
  n = config.data.ids_per_batch * config.data.images_per_id
  shape = (n, config.data.image_height, config.data.image_width, 3)
  labels = np.repeat(np.arange(config.data.ids_per_batch), config.data.images_per_id)
  return {"visible": rng.integers(0, 256, shape, dtype=np.uint8),
          "infrared": rng.integers(0, 256, shape, dtype=np.uint8),
          "labels": labels.astype(np.int32)}


def time_steps(step_fn, state, batches, mesh):
  started = time.perf_counter()
  state, metrics = step_fn(state, sharding_lib.host_to_global(batches[0], mesh))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - started
  global_batches = [sharding_lib.host_to_global(b, mesh) for b in batches[1:]]
  started = time.perf_counter()
  for batch in global_batches:
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  return compile_s, (time.perf_counter() - started) / len(global_batches)


def unit_rows(rng, shape):
  return memory_lib.unit_rows(jnp.asarray(rng.normal(size=shape), jnp.float32))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--dtype", default=None, help="model.compute_dtype override")
  parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
  args = parser.parse_args()
  overrides = {"model.compute_dtype": args.dtype} if args.dtype else {}
  config = config_lib.load_config(args.config, overrides)
  mesh = sharding_lib.make_mesh()
  model = builders.model_from_config(config)
  rng = np.random.default_rng(0)
  batches = [random_batch(config, rng) for _ in range(args.steps + 1)]
  dim = resnet.output_features(config.model.depth, config.model.width)
  variables = builders.init_model_variables(config, model, jax.random.key(0))
  n = config.data.ids_per_batch * config.data.images_per_id
  print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}, config {args.config}, "
        f"ResNet-{config.model.depth} width {config.model.width}, "
        f"{config.data.image_height}x{config.data.image_width}, {config.model.compute_dtype}, "
        f"{n} pairs per step")

  tx = builders.make_teacher_optimizer(config, steps_per_epoch=100)
  memories = memory_lib.init_memories(*(unit_rows(rng, (NUM_CLASSES, dim)) for _ in range(3)))
  state = state_lib.create_replicated_state(variables, tx, jax.random.key(1), mesh, memories)
  step = loop.jit_step(steps_lib.make_teacher_step(
      model, tx, builders.teacher_settings(config), builders.augment_views(config, "teacher"),
      hard_momentum=0.1, mean_momentum=0.25), mesh)
  compile_s, step_s = time_steps(step, state, batches, mesh)
  print(f"teacher: compile+first {compile_s:.1f} s | {1 / step_s:.2f} steps/s | "
        f"{3 * n / step_s:.0f} images/s through the network ({3 * n} per step: v, i, a)")

  teacher = sharding_lib.replicate(steps_lib.FrozenTeacher(
      variables, unit_rows(rng, (NUM_CLASSES, dim)), unit_rows(rng, (NUM_CLASSES, dim))), mesh)
  tx = builders.make_student_optimizer(config)
  state = state_lib.create_replicated_state(variables, tx, jax.random.key(2), mesh)
  student = loop.jit_step(steps_lib.make_student_step(
      model, tx, builders.distill_settings(config), builders.augment_views(config, "student"),
      double_bn_update=config.distill.double_bn_update), mesh, num_extra=1)
  compile_s, step_s = time_steps(lambda s, b: student(s, teacher, b), state, batches, mesh)
  print(f"student: compile+first {compile_s:.1f} s | {1 / step_s:.2f} steps/s | "
        f"{2 * n / step_s:.0f} images/s ({2 * n} per step, plus the frozen teacher's forward)")


if __name__ == "__main__":
  main()
