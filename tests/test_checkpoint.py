"""Tests for dakd_jax.checkpoint: round trips, weights-only restores, keep-last-and-best,
re-sharding on restore, a writer killed mid-save, the resume order and config comparison."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dakd_jax import checkpoint
from dakd_jax import stage_checkpoints
from dakd_jax import sharding
from tests.fake_devices import child_env, run_child


def _make_state(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "params": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)},
      "memory": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
      "step": jnp.asarray(17 + seed, jnp.int32),
  }


def _abstract(tree, target_sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target_sharding),
                      tree)


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _step_dirs(directory) -> set[int]:
  return {int(name) for name in os.listdir(directory) if name.isdigit()}


def _save_tiny(directory, steps, metrics=None):
  manager = checkpoint.CheckpointManager(directory, keep_last=10, use_async=False)
  for step in steps:
    manager.save(step, {"x": jnp.full((2,), step, jnp.float32)}, {"epoch": step},
                 metrics=None if metrics is None else metrics[step])
  manager.close()


def test_round_trip_state_and_metadata(tmp_path, caplog):
  state = _make_state()
  metadata = {"config": {"model": {"depth": 50, "temps": (4.0, 3.0)}}, "epoch": 2,
              "metrics": {"mAP": np.float32(0.25)}}
  manager = checkpoint.CheckpointManager(tmp_path / "ckpt")
  target = _abstract(state, sharding.replicated(sharding.make_mesh(1)))
  expected = jax.device_get(state)
  with jax.transfer_guard("disallow"):  # the loop runs with hidden copies forbidden
    assert manager.save(40, state, metadata, metrics={"mAP": 0.25})
    # The loop donates the state to the next step as soon as save returns.
    jax.tree.map(lambda leaf: leaf.delete(), state)
    manager.wait()
    restored, restored_meta = manager.restore(40, target)
  _assert_trees_equal(restored, expected)
  assert restored_meta == {"config": {"model": {"depth": 50, "temps": [4.0, 3.0]}}, "epoch": 2,
                           "metrics": {"mAP": 0.25}, "step": 40,
                           "evaluation": {"mAP": 0.25}}
  assert manager.read_metadata(40) == restored_meta
  assert (manager.latest_step(), manager.best_step()) == (40, 40)
  # Steps without metrics (most saves) are ordinary: no Orbax "tracked_metric" warning.
  manager.save(41, _make_state(1), {"epoch": 2})
  manager.close()
  assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]


def test_restore_of_missing_step_and_weights_only_restore(tmp_path):
  params = {"layer": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}}
  stats = {"layer": {"mean": jnp.full((3,), 0.5, jnp.float32)}}
  state = {"params": params, "batch_stats": stats, "opt_state": {"mu": jnp.ones((7, 7))},
           "memories": jnp.zeros((100, 3)), "step": jnp.asarray(5, jnp.int32)}
  manager = checkpoint.CheckpointManager(tmp_path, use_async=False)
  manager.save(5, state, {"stage": "teacher"})
  target = _abstract(state, sharding.replicated(sharding.make_mesh(1)))
  with pytest.raises(FileNotFoundError, match="step 3"):
    manager.restore(3, target)
  manager.close()
  # Only the model variables are read, onto a target that knows nothing of the rest.
  variables = stage_checkpoints.restore_variables(
      str(tmp_path), 5, _abstract({"params": params, "batch_stats": stats},
                                  sharding.replicated(sharding.make_mesh(1))))
  _assert_trees_equal(variables, {"params": params, "batch_stats": stats})
  wrong = {"params": {"layer": {"kernel": jnp.zeros((4, 3))}}, "batch_stats": stats}
  with pytest.raises(checkpoint.CheckpointError, match="does not fit|model.width"):
    stage_checkpoints.restore_variables(str(tmp_path), 5,
                                 _abstract(wrong, sharding.replicated(sharding.make_mesh(1))))


def test_checkpoints_with_an_old_data_item_still_restore(tmp_path):
  """Checkpoints of earlier versions also hold a Grain 'data' item; it is ignored now."""
  import orbax.checkpoint as ocp
  state = {"w": jnp.arange(3, dtype=jnp.float32)}
  old = ocp.CheckpointManager(str(tmp_path), item_handlers={
      "state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler()})
  old.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      metadata=ocp.args.JsonSave({"epoch": 1, "step": 7}),
                                      data=ocp.args.JsonSave({"next_index": 3})))
  old.close()
  manager = checkpoint.CheckpointManager(tmp_path, read_only=True)
  restored, metadata = manager.restore(7, _abstract(state, sharding.replicated(
      sharding.make_mesh(1))))
  manager.close()
  np.testing.assert_array_equal(np.asarray(restored["w"]), [0.0, 1.0, 2.0])
  assert metadata == {"epoch": 1, "step": 7}


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="keep_last=0"):
    checkpoint.CheckpointManager(tmp_path, keep_last=0)
  manager = checkpoint.CheckpointManager(tmp_path, use_async=False)
  with pytest.raises(ValueError, match="lack 'mAP'"):
    manager.save(1, {"w": jnp.zeros(2)}, {}, metrics={"rank1": 0.5})
  with pytest.raises(TypeError, match="checkpoint JSON"):
    manager.save(1, {"w": jnp.zeros(2)}, {"bad": object()})
  assert manager.save(2, {"w": jnp.zeros(2)}, {})
  assert not manager.save(2, {"w": jnp.ones(2)}, {})  # skipped, with a warning
  with pytest.raises(ValueError, match="already has step 2"):
    manager.save(1, {"w": jnp.zeros(2)}, {}, metrics={"mAP": 0.5})
  assert manager.all_steps() == [2]
  manager.close()


def test_keep_last_and_best_survives_reopen(tmp_path):
  directory = tmp_path / "ckpt"
  maps = {1: 0.30, 2: 0.90, 3: None, 4: 0.40, 5: None, 6: 0.50}
  manager = checkpoint.CheckpointManager(directory, keep_last=2, keep_best=1)
  for step, value in maps.items():
    manager.save(step, {"w": jnp.full((3,), step, jnp.float32)}, {"epoch": step},
                 metrics=None if value is None else {"mAP": value})
  manager.wait()
  # Newest two (5, 6) plus the best (2, old); 1, 3, 4 deleted from disk.
  assert _step_dirs(directory) == {2, 5, 6}
  assert manager.all_steps() == [2, 5, 6]
  assert manager.best_step() == 2 and manager.latest_step() == 6
  manager.close()

  reopened = checkpoint.CheckpointManager(directory, keep_last=2, keep_best=1)
  assert reopened.best_step() == 2  # metrics are read back from disk
  reopened.save(7, {"w": jnp.full((3,), 7.0)}, {"epoch": 7}, metrics={"mAP": 0.1})
  reopened.wait()
  assert _step_dirs(directory) == {2, 6, 7}
  target = _abstract({"w": jnp.zeros(3)}, sharding.replicated(sharding.make_mesh(1)))
  restored, metadata = reopened.restore(2, target)
  np.testing.assert_array_equal(np.asarray(restored["w"]), [2.0, 2.0, 2.0])
  assert metadata == {"epoch": 2, "step": 2, "evaluation": {"mAP": 0.9}}
  reopened.close()


def test_restore_onto_a_different_device_layout(tmp_path):
  """1 device -> 4 devices (sharded on data) and 4 devices -> 1 device."""
  one_device = sharding.replicated(sharding.make_mesh(1))
  rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  manager = checkpoint.CheckpointManager(tmp_path / "from_one", use_async=False)
  manager.save(5, {"rows": jax.device_put(rows, one_device), "scale": jnp.float32(2.5)},
               {"epoch": 1})
  manager.close()
  script = """
    import sys
    from absl import flags; flags.FLAGS.mark_as_parsed()
    import jax, numpy as np, jax.numpy as jnp
    from dakd_jax import checkpoint, sharding
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 4
    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    split, whole = sharding.data_sharding(mesh), sharding.replicated(mesh)
    target = {"rows": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=split),
              "scale": jax.ShapeDtypeStruct((), jnp.float32, sharding=whole)}
    manager = checkpoint.CheckpointManager(sys.argv[1], read_only=True)
    state, _ = manager.restore(5, target)
    assert state["rows"].sharding == sharding.data_sharding(mesh)
    devices = list(mesh.devices.flat)
    for shard in state["rows"].addressable_shards:
      i = devices.index(shard.device)
      np.testing.assert_array_equal(np.asarray(shard.data), rows[2 * i:2 * i + 2])
    assert float(state["scale"]) == 2.5
    writer = checkpoint.CheckpointManager(sys.argv[2], use_async=False)
    writer.save(9, {"rows": jax.device_put(rows * 2, sharding.data_sharding(mesh)),
                    "scale": jax.device_put(np.float32(-1.0), sharding.replicated(mesh))},
                {"epoch": 3})
    writer.close()
    print("OK")
  """
  run_child(script, 4, str(tmp_path / "from_one"), str(tmp_path / "from_four"))
  target = {"rows": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=one_device),
            "scale": jax.ShapeDtypeStruct((), jnp.float32, sharding=one_device)}
  reader = checkpoint.CheckpointManager(tmp_path / "from_four", read_only=True)
  state, metadata = reader.restore(9, target)
  np.testing.assert_array_equal(np.asarray(state["rows"]), rows * 2)
  assert float(state["scale"]) == -1.0
  assert metadata == {"epoch": 3, "step": 9}
  assert state["rows"].sharding == one_device


_KILL_SCRIPT = """
  import os, sys, time
  from absl import flags; flags.FLAGS.mark_as_parsed()
  import jax.numpy as jnp, numpy as np
  from dakd_jax import checkpoint
  directory, marker = sys.argv[1], sys.argv[2]
  manager = checkpoint.CheckpointManager(directory, keep_last=3)
  manager.save(1, {"w": jnp.arange(4, dtype=jnp.float32)}, {"epoch": 1})
  manager.wait()
  import orbax.checkpoint as ocp
  original = ocp.JsonCheckpointHandler.async_save
  async def stall(self, directory, *args, **kwargs):
    # Runs inside step 2's write, after its temporary directory exists: signal the parent,
    # then stall so the SIGKILL lands before the checkpoint is committed.
    open(marker, "w").close()
    time.sleep(120)
    return await original(self, directory, *args, **kwargs)
  ocp.JsonCheckpointHandler.async_save = stall
  big = np.random.default_rng(0).normal(size=(2_000_000,)).astype(np.float32)
  manager.save(2, {"w": jnp.asarray(big)}, {"epoch": 2})
  time.sleep(120)
"""


def test_sigkill_during_save_keeps_previous_step(tmp_path):
  directory, marker = tmp_path / "ckpt", tmp_path / "writing_step_2"
  child = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(_KILL_SCRIPT), str(directory), str(marker)],
      env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 60
    # The marker says step 2's write started; Orbax creates its temporary folder in a
    # background thread, which may come a moment later on a busy machine: kill once it exists.
    while not (marker.exists() and any(name.startswith("2.") for name in os.listdir(directory))):
      assert child.poll() is None, child.communicate()
      assert time.monotonic() < deadline, (
          "child never started writing step 2", os.listdir(directory) if directory.exists()
          else None)
      time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
  leftovers = [name for name in os.listdir(directory) if not name.isdigit()]
  assert any(name.startswith("2.") for name in leftovers), os.listdir(directory)
  assert _step_dirs(directory) == {1}
  assert checkpoint.complete_steps(directory) == [1]
  assert checkpoint.find_resume_checkpoint(directory, None) == (str(directory), 1)

  manager = checkpoint.CheckpointManager(directory, keep_last=3)
  assert manager.latest_step() == 1 and manager.all_steps() == [1]
  target = _abstract({"w": jnp.zeros(4)}, sharding.replicated(sharding.make_mesh(1)))
  state, metadata = manager.restore(1, target)
  np.testing.assert_array_equal(np.asarray(state["w"]), [0.0, 1.0, 2.0, 3.0])
  assert metadata == {"epoch": 1, "step": 1}
  # A writable manager removes the partial directory, and step 2 can be written again.
  manager.save(2, {"w": jnp.ones(4)}, {"epoch": 2})
  manager.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_find_resume_checkpoint_order_and_errors(tmp_path):
  own, other = tmp_path / "run" / "checkpoints", tmp_path / "other"
  assert checkpoint.find_resume_checkpoint(own, "") is None
  assert checkpoint.find_resume_checkpoint(own, None) is None
  with pytest.raises(FileNotFoundError, match=r"checkpoint.resume='.*missing' does not exist"):
    checkpoint.find_resume_checkpoint(own, str(tmp_path / "missing"))
  other.mkdir()
  with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
    checkpoint.find_resume_checkpoint(own, str(other))
  _save_tiny(other, [1, 3])
  assert checkpoint.find_resume_checkpoint(own, str(other)) == (str(other), 3)
  assert checkpoint.find_resume_checkpoint(own, str(other / "1")) == (str(other), 1)
  # An incomplete write in the run's own directory does not count as a checkpoint.
  (own / "4.orbax-checkpoint-tmp-123").mkdir(parents=True)
  assert checkpoint.find_resume_checkpoint(own, str(other)) == (str(other), 3)
  _save_tiny(own, [2])
  # The run's own checkpoint wins, even over a named path that has since disappeared.
  assert checkpoint.find_resume_checkpoint(own, str(other)) == (str(own), 2)
  assert checkpoint.find_resume_checkpoint(own, str(tmp_path / "gone")) == (str(own), 2)


def test_diff_configs_lists_changes_and_skips_ignored():
  old = {"seed": 0, "model": {"depth": 50, "gem_p": 3.0},
         "distill": {"temperatures": [4.0, 3.0]},
         "checkpoint": {"resume": "/a", "keep_last": 2}, "log": {"every_steps": 50},
         "data": {"root": "/data/a", "trial": 1}, "dropped": True}
  new = ml_collections.ConfigDict({
      "seed": 0, "model": {"depth": 18, "gem_p": 3.0},
      "distill": {"temperatures": (4.0, 3.0)},
      "checkpoint": {"resume": "/b", "keep_last": 5}, "log": {"every_steps": 10},
      "data": {"root": "/data/b", "trial": 2}, "added": "x"})
  assert checkpoint.diff_configs(old, new) == [
      "added: '<absent>' -> 'x'",
      "data.trial: 1 -> 2",
      "dropped: True -> '<absent>'",
      "model.depth: 50 -> 18",
  ]
  assert checkpoint.diff_configs(old, old) == []
  assert checkpoint.diff_configs({"a": {"b": 1}}, {"a": {"b": 2}}, ignore=()) == ["a.b: 1 -> 2"]
  assert checkpoint.diff_configs({"a": {"b": 1}}, {"a": {"b": 2}}, ignore=("a.*",)) == []


def test_restore_refuses_a_changed_config(tmp_path):
  config = {"model": {"depth": 50}, "checkpoint": {"resume": ""}}
  manager = checkpoint.CheckpointManager(tmp_path, use_async=False)
  manager.save(3, {"w": jnp.ones(2)}, {"config": config})
  target = _abstract({"w": jnp.zeros(2)}, sharding.replicated(sharding.make_mesh(1)))
  changed = {"model": {"depth": 18}, "checkpoint": {"resume": "/elsewhere"}}
  with pytest.raises(checkpoint.CheckpointError) as error:
    manager.restore(3, target, config=changed)
  message = str(error.value)
  assert "model.depth: 50 -> 18" in message and "allow_config_change" in message
  assert "checkpoint.resume" not in message  # a path that may change on resume
  state, metadata = manager.restore(3, target, config=changed, allow_config_change=True)
  np.testing.assert_array_equal(np.asarray(state["w"]), [1.0, 1.0])
  assert metadata["config"] == config
  same_but_paths = {"model": {"depth": 50}, "checkpoint": {"resume": "/elsewhere"}}
  manager.restore(3, target, config=same_but_paths)
  manager.close()


def test_relative_directory_round_trip(tmp_path, monkeypatch):
  # `--workdir=workdirs/demo` reaches the manager as a relative path; Orbax needs absolute ones.
  monkeypatch.chdir(tmp_path)
  mesh = sharding.make_mesh()
  state = {"w": jnp.arange(6.0).reshape(2, 3)}
  manager = checkpoint.CheckpointManager(os.path.join("workdirs", "run", "checkpoints"),
                                         use_async=False)
  manager.save(1, state, {"note": "relative"})
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=sharding.replicated(mesh)), state)
  restored, metadata = manager.restore(1, target)
  manager.close()
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3))
  assert metadata["note"] == "relative"
  assert os.path.isdir(tmp_path / "workdirs" / "run" / "checkpoints" / "1")
