"""Sized before it starts (dakd_jax/train/memory_plan.py): a step that cannot fit stops the
run in one line at start-up; one that fits prints its plan and trains."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax import cli
from dakd_jax import config as config_lib
from dakd_jax import errors
from dakd_jax import sharding as sharding_lib
from dakd_jax.train import loop
from dakd_jax.train import memory_plan
from dakd_jax.train import steps as steps_lib
from tests import tiny
from tests.test_train import tiny_overrides

GIB = 1024 ** 3


def test_step_bytes_of_a_donated_update_is_its_buffer_once():
  """x + 1 with x donated: 4 MiB in, 4 MiB out written over it, no temporaries -> 4 MiB."""
  x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
  compiled = jax.jit(lambda v: v + 1, donate_argnums=0).lower(x).compile()
  assert memory_plan.step_bytes(compiled.memory_analysis()) == 4 * 1024 * 1024
  kept = jax.jit(lambda v: v + 1).lower(x).compile()  # Not donated: in and out both held.
  assert memory_plan.step_bytes(kept.memory_analysis()) == 8 * 1024 * 1024


def test_the_student_steps_first_call_reuses_the_memory_plans_compile(capsys):
  """The plan is compiled from the frozen teacher's shapes before its centres exist; the
  first step, given the real (replicated) teacher, runs that program: the step is traced once.
  Before, the plan's unsharded stand-ins made the step trace and compile a second time."""
  mesh = sharding_lib.make_mesh()
  traces = []

  def step(state, teacher, batch):
    traces.append(1)  # Runs only while tracing.
    logits = batch["images"] @ teacher.variables["params"]["w"]
    new_state = state + jnp.sum(logits @ teacher.centres_visible.T) + jnp.sum(
        teacher.centres_infrared)
    return new_state, {"loss": jnp.sum(logits)}

  compiled = loop.jit_step(step, mesh, num_extra=1)
  config = config_lib.load_config("configs/demo.py", validate_config=False)
  data = sharding_lib.data_sharding(mesh)
  variables = {"params": {"w": np.ones((3, 4), np.float32)}}
  batch = {"images": jax.device_put(np.ones((2, 3), np.float32), data)}
  state = jax.device_put(np.float32(0), sharding_lib.replicated(mesh))
  abstract = loop.abstract_frozen_teacher(variables, 5, 4, mesh)
  memory_plan.check_step_memory(
      compiled, (state, abstract, {"images": jax.ShapeDtypeStruct((2, 3), jnp.float32,
                                                             sharding=data)}),
      "student", config)
  assert "memory plan: student step" in capsys.readouterr().out
  centres = np.arange(20, dtype=np.float32).reshape(5, 4)
  teacher = sharding_lib.replicate(
      steps_lib.FrozenTeacher(variables, centres, centres + 1), mesh)
  new_state, metrics = compiled(state, teacher, batch)
  assert len(traces) == 1
  # The program is the step: 2 rows of (1,1,1) @ ones(3, 4) = 3s; against the centres' sums.
  assert float(metrics["loss"]) == 24.0
  assert float(new_state) == 3 * 2 * centres.sum() + (centres + 1).sum()


def test_host_memory_is_the_lower_of_meminfo_and_the_cgroup_room(tmp_path):
  (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    8388608 kB\n")
  (tmp_path / "memory.max").write_text(f"{6 * GIB}\n")
  (tmp_path / "memory.current").write_text(f"{1 * GIB}\n")
  free, source = memory_plan.host_available_bytes(str(tmp_path / "meminfo"), str(tmp_path))
  assert free == 5 * GIB and "cgroup limit 6.0 GiB" in source
  (tmp_path / "memory.max").write_text("max\n")  # No limit: MemAvailable, 8 GiB.
  assert memory_plan.host_available_bytes(str(tmp_path / "meminfo"), str(tmp_path)) == (
      8 * GIB, "available host memory")
  # What the process's allocator holds free is resident (not in MemAvailable) and its own.
  free, source = memory_plan.host_available_bytes(str(tmp_path / "meminfo"), str(tmp_path),
                                                  held_free=GIB // 2)
  assert free == 8 * GIB + GIB // 2
  assert source == "available host memory, with 0.50 GiB this process holds free"


def _config(**fields):
  config = config_lib.load_config("configs/sysu.py", [f"{k}={v}" for k, v in fields.items()])
  return config


def test_a_step_that_cannot_fit_is_refused_with_the_knobs_and_what_they_bring(capsys):
  config = _config(**{"data.ids_per_batch": 8})
  with pytest.raises(errors.InsufficientMemoryError) as refused:
    memory_plan.check_plan("teacher", 30 * GIB, 24 * GIB, (20 * GIB, "fake memory"), config)
  message = str(refused.value)
  assert "\n" not in message
  assert message.startswith("teacher step: 30.00 GiB per step (64 images of 384x128; "
                            "temporaries 24.00) of 20.00 GiB (fake memory): it cannot fit")
  # Half the identities: temporaries scale with the batch, 24 GiB x 1/2 = 12 GiB less.
  assert "--config.data.ids_per_batch=4 (about 12.0 GiB less)" in message
  assert "--config.model.compute_dtype=bfloat16 (up to about 12.0 GiB less" in message
  assert "--config.model.remat=" in message
  assert capsys.readouterr().out == ""


def test_a_fitting_step_prints_its_plan_and_warns_near_the_limit(capsys):
  config = _config()
  line = memory_plan.check_plan("student", 2 * GIB, GIB, (10 * GIB, "fake memory"), config)
  assert capsys.readouterr().out == f"dakd_jax: memory plan: {line}\n"
  assert line.startswith("student step: 2.00 GiB per step") and "warning" not in line
  line = memory_plan.check_plan("student", 9 * GIB, GIB, (10 * GIB, "fake memory"), config)
  assert line.startswith("warning: ") and line.endswith("close to the limit")
  assert "close to the limit" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("limit_bytes, code", [(2 ** 20, 1), (2 ** 40, 0)])
def test_a_tiny_teacher_under_a_fake_limit(tmp_path, monkeypatch, capsys, limit_bytes, code):
  """1 MiB: refused in one line before any training (no checkpoint); 1 TiB: it trains."""
  monkeypatch.setattr(memory_plan, "device_available_bytes",
                      lambda device=None: (limit_bytes, "fake limit"))
  args = ["--config=configs/demo.py"] + tiny_overrides(str(tmp_path), **{
      "stage": "teacher", "eval.pictures": False})
  assert cli.main_from_args(args, str(tmp_path / "run")) == code
  captured = capsys.readouterr()
  checkpoints = os.path.join(tmp_path, "run", "teacher", "checkpoints")
  if code:
    assert captured.err.strip().splitlines()[-1].startswith(
        "dakd_jax: error: teacher step: ")
    assert "of 0.00 GiB (fake limit): it cannot fit; reduce it with" in captured.err
    assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints)
    assert "memory:" not in captured.out + captured.err  # No memory rebuild ran.
  else:
    assert "dakd_jax: memory plan: teacher step: " in captured.out
    assert os.listdir(checkpoints) == [str(tiny.TEACHER_STEPS)]
