"""Tests for dakd_jax.sharding: mesh, shardings, batch checks and host batches to global arrays.

Multi-device cases run in a subprocess with 4 fake CPU devices (the flag must be set before JAX
starts); the multi-process case runs two processes that meet on 127.0.0.1.
"""
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dakd_jax import sharding
from tests.fake_devices import child_env, run_child


def test_check_batch_divides_accepts_multiples():
  sharding.check_batch_divides(32, 4, "data.ids_per_batch")
  sharding.check_batch_divides(7, 1, "data.ids_per_batch")


@pytest.mark.parametrize("batch, devices, suggestion", [(30, 4, "28 or 32"), (3, 4, "4")])
def test_check_batch_divides_names_field_and_fix(batch, devices, suggestion):
  with pytest.raises(ValueError) as error:
    sharding.check_batch_divides(batch, devices, "data.ids_per_batch")
  message = str(error.value)
  assert "data.ids_per_batch" in message
  assert f"global batch {batch}" in message and f"{devices} devices" in message
  assert f"(e.g. {suggestion})" in message


def test_make_mesh_single_device_and_bad_count():
  mesh = sharding.make_mesh(1)
  assert mesh.axis_names == ("data",)
  assert list(mesh.devices.flat) == [jax.devices()[0]]
  with pytest.raises(ValueError, match="num_devices=0"):
    sharding.make_mesh(0)
  with pytest.raises(ValueError, match=f"num_devices={len(jax.devices()) + 1}"):
    sharding.make_mesh(len(jax.devices()) + 1)


def test_host_to_global_single_device_keeps_values_and_dtypes():
  mesh = sharding.make_mesh(1)
  batch = {"images": np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3),
           "labels": np.array([5, 7], np.int32)}
  out = sharding.host_to_global(batch, mesh)
  for name, value in batch.items():
    assert out[name].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(out[name]), value)
    assert out[name].sharding == sharding.data_sharding(mesh)


def test_host_to_global_rejects_bad_batches():
  mesh = sharding.make_mesh(1)
  with pytest.raises(ValueError, match=r"\['scalar'\].*leading batch axis"):
    sharding.host_to_global({"scalar": np.float32(1.0)}, mesh)
  with pytest.raises(ValueError, match=r"disagree.*\[2, 3\]"):
    sharding.host_to_global({"a": np.zeros((2, 1)), "b": np.zeros((3,))}, mesh)


def test_host_to_global_on_four_devices():
  run_child("""
    from absl import flags; flags.FLAGS.mark_as_parsed()
    import jax, numpy as np
    from dakd_jax import sharding
    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh()
    assert mesh.devices.shape == (4,) and mesh.axis_names == ("data",)
    images = np.arange(8 * 5 * 5 * 3).reshape(8, 5, 5, 3).astype(np.uint8)
    labels = np.arange(100, 108, dtype=np.int32)
    out = sharding.host_to_global({"images": images, "labels": labels}, mesh)
    assert out["images"].shape == (8, 5, 5, 3) and out["images"].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(out["images"]), images)
    np.testing.assert_array_equal(np.asarray(out["labels"]), labels)
    assert out["labels"].sharding.spec == jax.sharding.PartitionSpec("data")
    # Device i of the mesh holds rows 2i, 2i+1.
    for shard in out["labels"].addressable_shards:
      position = list(mesh.devices.flat).index(shard.device)
      np.testing.assert_array_equal(np.asarray(shard.data), labels[2 * position:2 * position + 2])
    weights = jax.device_put(np.ones((3, 2), np.float32), sharding.replicated(mesh))
    assert all(s.data.shape == (3, 2) for s in weights.addressable_shards)
    assert len(weights.addressable_shards) == 4
    try:
      sharding.host_to_global({"labels": labels[:6]}, mesh)
      raise AssertionError("6 rows on 4 devices did not fail")
    except ValueError as error:
      assert "global batch 6" in str(error) and "4 devices" in str(error), error
    assert sharding.make_mesh(2).devices.shape == (2,)
    print("OK")
  """, device_count=4)


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_host_to_global_two_processes():
  """Each process passes its own 4 rows; the global array has 8, split over 4 devices."""
  script = textwrap.dedent("""
    import sys
    from absl import flags; flags.FLAGS.mark_as_parsed()
    import jax, numpy as np
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from dakd_jax import sharding
    mesh = sharding.make_mesh()
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    global_labels = np.arange(8, dtype=np.int32) * 10
    index = jax.process_index()
    local = global_labels[4 * index:4 * index + 4]
    out = sharding.host_to_global({"labels": local}, mesh)
    assert out["labels"].shape == (8,), out["labels"].shape
    devices = list(mesh.devices.flat)
    for shard in out["labels"].addressable_shards:
      position = devices.index(shard.device)
      np.testing.assert_array_equal(np.asarray(shard.data),
                                    global_labels[2 * position:2 * position + 2])
    print("OK", index)
  """)
  address = f"127.0.0.1:{_free_port()}"
  env = child_env(2)
  children = [subprocess.Popen([sys.executable, "-c", script, address, str(index)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for index in range(2)]
  outputs = []
  try:
    for child in children:
      stdout, stderr = child.communicate(timeout=60)
      outputs.append((child.returncode, stdout, stderr))
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
  for index, (code, stdout, stderr) in enumerate(outputs):
    assert code == 0, f"process {index} failed:\n{stdout}\n{stderr}"
    assert f"OK {index}" in stdout
