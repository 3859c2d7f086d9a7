"""Sized before it starts: a training stage's compiled step against the memory there is.

At start-up, before the memory rebuild or the teacher's centres, each training stage lowers and
compiles its step for the configured batch and input size (the compile the first step would do;
jit reuses it then) and reads XLA's memory analysis: arguments + outputs + temporaries - the
outputs written over donated arguments. The memory there is: on an accelerator the device's
byte limit (`memory_stats()["bytes_limit"]`); on a CPU what the process may still take (the
kernel's MemAvailable, and the cgroup's memory.max less memory.current when that is lower, plus
what the process's allocator holds free for it: dakd_jax.host_allocator).
One line states the plan; a step that does not fit stops the run in one message with the knobs
that reduce it; above WARN_FRACTION of the memory, a warning.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import jax
import ml_collections

from dakd_jax import errors
from dakd_jax import host_allocator
from dakd_jax import progress

GIB = 1024 ** 3
WARN_FRACTION = 0.85  # Above this share of the memory the plan line is a warning.


def step_bytes(memory_analysis: Any) -> int:
  """What a compiled step needs: arguments + outputs + temporaries - donated (aliased)."""
  return int(memory_analysis.argument_size_in_bytes + memory_analysis.output_size_in_bytes
             + memory_analysis.temp_size_in_bytes - memory_analysis.alias_size_in_bytes)


def _meminfo_available(path: str) -> int | None:
  try:
    with open(path, encoding="utf-8") as file:
      for line in file:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _read_int(path: str) -> int | None:
  try:
    with open(path, encoding="utf-8") as file:
      text = file.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None  # "max" = no limit.


def host_available_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup",
                         held_free: int = 0) -> tuple[int, str] | None:
  """(bytes, where from) the process may still allocate on the host: MemAvailable, or the
  cgroup v2 limit less its current use when that is lower, plus `held_free` (what its own
  allocator holds free: resident, so counted as used, and reused before asking for more;
  dakd_jax.host_allocator); None when neither is readable."""
  found = []
  available = _meminfo_available(meminfo)
  if available is not None:
    found.append((available, "available host memory"))
  limit = _read_int(os.path.join(cgroup, "memory.max"))
  current = _read_int(os.path.join(cgroup, "memory.current"))
  if limit is not None and current is not None:
    found.append((max(limit - current, 0), f"cgroup limit {limit / GIB:.1f} GiB less its use"))
  if not found:
    return None
  free, source = min(found)
  if held_free > 0:
    source += f", with {held_free / GIB:.2f} GiB this process holds free"
  return free + held_free, source


def device_available_bytes(device: Any = None) -> tuple[int, str] | None:
  """(bytes, where from) of the memory a step runs in: an accelerator's byte limit, or the
  host's (`host_available_bytes`) for a CPU device."""
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    return host_available_bytes(held_free=host_allocator.free_bytes())
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # some backends raise instead of None
    stats = {}
  if "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]), f"{device.device_kind} memory"


def reducing_knobs(config: ml_collections.ConfigDict, temporaries: int) -> list[str]:
  """The settings that lower a step's memory, with what each would bring where an estimate is
  cheap (temporaries scale with the batch; bfloat16 halves the activations at most)."""
  knobs = []
  ids = config.data.ids_per_batch
  if ids > 1:
    half = max(ids // 2, 1)
    saved = temporaries * (1 - half / ids)
    knobs.append(f"--config.data.ids_per_batch={half} (about {saved / GIB:.1f} GiB less)")
  if config.model.compute_dtype != "bfloat16":
    knobs.append(f"--config.model.compute_dtype=bfloat16 (up to about "
                 f"{temporaries / 2 / GIB:.1f} GiB less on an accelerator)")
  if tuple(config.model.remat) != ("stem", "non_local"):
    knobs.append("--config.model.remat='(\"stem\",\"non_local\")' (an accelerator may keep "
                 "fewer activations; XLA:CPU folds it back)")
  return knobs


def check_plan(stage: str, needed: int, temporaries: int, available: tuple[int, str] | None,
               config: ml_collections.ConfigDict) -> str:
  """The plan line of a step needing `needed` bytes; prints it (a warning near the limit).

  Raises:
    errors.InsufficientMemoryError: the step needs more than there is.
  """
  batch = 2 * config.data.ids_per_batch * config.data.images_per_id
  size = f"{batch} images of {config.data.image_height}x{config.data.image_width}"
  if available is None:
    line = f"{stage} step: {needed / GIB:.2f} GiB per step ({size}); available memory unknown"
  else:
    free, source = available
    line = (f"{stage} step: {needed / GIB:.2f} GiB per step ({size}; temporaries "
            f"{temporaries / GIB:.2f}) of {free / GIB:.2f} GiB ({source})")
    if needed > free:
      raise errors.InsufficientMemoryError(
          f"{line}: it cannot fit; reduce it with " + ", ".join(reducing_knobs(config,
                                                                              temporaries)))
    if needed > WARN_FRACTION * free:
      line = f"warning: {line}, close to the limit"
  if jax.process_index() == 0:
    print(f"dakd_jax: memory plan: {line}", file=sys.stderr if "warning" in line else sys.stdout,
          flush=True)
  return line


def check_step_memory(jitted: Any, args: Sequence[Any], stage: str,
                      config: ml_collections.ConfigDict) -> str:
  """Compiles `jitted` for `args` (arrays or jax.ShapeDtypeStruct) and checks its memory plan
  against the first local device (`check_plan`); the compile is cached for the first step."""
  # A ResNet-50 step compiles for seconds to minutes: a log file hears of it meanwhile.
  with progress.heartbeat(f"{stage} memory plan",
                          enabled=config.log.progress and jax.process_index() == 0) as beat:
    beat.step("compiling the step")
    memory = jitted.lower(*args).compile().memory_analysis()
  if memory is None:  # A backend without the analysis: nothing to plan with.
    return f"{stage} step: no memory analysis on this backend"
  return check_plan(stage, step_bytes(memory), int(memory.temp_size_in_bytes),
                    device_available_bytes(), config)


def abstract_batch(config: ml_collections.ConfigDict, sharding: Any) -> dict:
  """The global training batch's shapes: {'visible', 'infrared': uint8 [n, H, W, 3],
  'labels': int32 [n]} with n = ids_per_batch x images_per_id, on `sharding`."""
  n = config.data.ids_per_batch * config.data.images_per_id
  image = (n, config.data.image_height, config.data.image_width, 3)
  return {"visible": jax.ShapeDtypeStruct(image, "uint8", sharding=sharding),
          "infrared": jax.ShapeDtypeStruct(image, "uint8", sharding=sharding),
          "labels": jax.ShapeDtypeStruct((n,), "int32", sharding=sharding)}
