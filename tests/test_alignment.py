"""Tests of dakd_jax.losses.alignment against a float64 NumPy re-statement of method.md 3.3."""
import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax.losses.alignment import (TeacherSettings, centre_triplet, memory_cross_entropy,
                                       modality_kl, teacher_loss)
from dakd_jax.losses.memory import init_memories
from tests.fake_devices import run_child
from tests.numpy_reference import np_log_softmax, numeric_grad

TAU = 0.05


def np_unit_rows(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_memory_ce(z, centres, labels, tau=TAU):
  total = 0.0
  for k in range(len(z)):
    total -= np_log_softmax(centres @ z[k] / tau)[labels[k]]
  return total / len(z)


def np_modality_kl(z_v, z_i, z_a, s_v, s_i, s_a, targets_from=None, tau=TAU):
  """(1/3n) sum KL(Q||P); the Q side from `targets_from` (frozen copies) when given."""
  q_v, q_i, q_a = targets_from if targets_from is not None else (z_v, z_i, z_a)
  total = 0.0
  for k in range(len(z_v)):
    pairs = ((s_v @ z_v[k], s_v @ q_i[k]),   # visible vs paired infrared, visible centres
             (s_i @ z_i[k], s_i @ q_v[k]),   # infrared vs paired visible, infrared centres
             (s_a @ z_a[k], s_i @ q_a[k]))   # augmented: own centres vs infrared centres
    for prediction, target in pairs:
      log_p, log_q = np_log_softmax(prediction / tau), np_log_softmax(target / tau)
      total += np.sum(np.exp(log_q) * (log_q - log_p))
  return total / (3 * len(z_v))


def np_triplet(z, labels, snapshot, margin=0.3):
  total = 0.0
  for k in range(len(z)):
    dist = lambda c: np.sqrt(max(np.sum((z[k] - snapshot[c])**2), 1e-12))
    d_pos = dist(labels[k])
    negatives = [dist(labels[j]) for j in range(len(z)) if labels[j] != labels[k]]
    if negatives:
      total += max(0.0, d_pos - min(negatives) + margin)
  return total / len(z)


def np_teacher_loss(g_v, g_i, g_a, labels, memories, frozen=None):
  z_v, z_i, z_a = (np_unit_rows(np.asarray(g, np.float64)) for g in (g_v, g_i, g_a))
  targets = None
  if frozen is not None:
    targets = [np_unit_rows(np.asarray(g, np.float64)) for g in frozen]
  m = {name: np.asarray(value, np.float64) for name, value in vars(memories).items()}
  z_all, labels_all = np.concatenate([z_v, z_i, z_a]), np.concatenate([labels] * 3)
  return (np_triplet(z_all, labels_all, m["snapshot_global"])
          + np_memory_ce(z_all, m["global_"], labels_all)
          + 1.0 * (np_memory_ce(z_v, m["visible"], labels)
                   + np_memory_ce(z_i, m["infrared"], labels))
          + 0.4 * np_memory_ce(z_a, m["channel"], labels)
          + 1.2 * np_modality_kl(z_v, z_i, z_a, m["snapshot_visible"], m["snapshot_infrared"],
                                 m["snapshot_channel"], targets_from=targets))


def random_unit(rng, *shape):
  return np_unit_rows(rng.normal(size=shape)).astype(np.float32)


def test_memory_cross_entropy_value_and_gradient():
  rng = np.random.default_rng(0)
  z, centres = random_unit(rng, 6, 5), random_unit(rng, 4, 5)
  labels = np.array([0, 1, 3, 3, 2, 0], np.int32)
  got = memory_cross_entropy(jnp.asarray(z), jnp.asarray(centres), jnp.asarray(labels), TAU)
  np.testing.assert_allclose(got, np_memory_ce(z, centres, labels), rtol=1e-5)
  grads = jax.grad(memory_cross_entropy, argnums=(0, 1))(
      jnp.asarray(z), jnp.asarray(centres), jnp.asarray(labels), TAU)
  expected = numeric_grad(lambda x: np_memory_ce(x, centres, labels), z.astype(np.float64))
  np.testing.assert_allclose(grads[0], expected, rtol=1e-3, atol=1e-4)
  np.testing.assert_array_equal(grads[1], 0.0)  # memories are not trained by gradients


def test_modality_kl_pairs_rows_and_stops_the_target_gradient():
  rng = np.random.default_rng(1)
  z_v, z_i, z_a = (random_unit(rng, 4, 6) for _ in range(3))
  snapshots = [random_unit(rng, 5, 6) for _ in range(3)]
  args = [jnp.asarray(x) for x in (z_v, z_i, z_a, *snapshots)]
  got = modality_kl(*args, TAU)
  np.testing.assert_allclose(got, np_modality_kl(z_v, z_i, z_a, *snapshots), rtol=1e-5)
  # Swapping the paired infrared rows changes the value: the row pairing matters.
  swapped = modality_kl(args[0], args[1][::-1], *args[2:], TAU)
  assert abs(float(swapped) - float(got)) > 1e-3
  grads = jax.grad(modality_kl, argnums=(0, 1, 2))(*args, TAU)
  frozen = [x.astype(np.float64) for x in (z_v, z_i, z_a)]
  for position, grad in enumerate(grads):
    def fn(x, position=position):
      views = list(frozen)
      views[position] = x
      return np_modality_kl(*views, *snapshots, targets_from=frozen)
    np.testing.assert_allclose(grad, numeric_grad(fn, frozen[position]), rtol=1e-3, atol=1e-4)


def test_centre_triplet_value_gradient_and_edge_cases():
  rng = np.random.default_rng(2)
  snapshot = random_unit(rng, 6, 5) * 0.8  # the global snapshot is not re-normalised
  labels = np.array([0, 0, 2, 2, 5, 5, 2], np.int32)
  z = random_unit(rng, 7, 5)
  got = centre_triplet(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(snapshot), 0.3)
  assert float(got) > 0
  np.testing.assert_allclose(got, np_triplet(z, labels, snapshot), rtol=1e-5)
  # Only identities present in the batch are negatives: moving an absent centre (1) onto the
  # rows changes nothing.
  moved = snapshot.copy()
  moved[1] = z[0]
  np.testing.assert_allclose(centre_triplet(jnp.asarray(z), jnp.asarray(labels),
                                            jnp.asarray(moved)), got, rtol=1e-6)
  grad = jax.grad(centre_triplet)(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(snapshot))
  expected = numeric_grad(lambda x: np_triplet(x, labels, snapshot), z.astype(np.float64))
  np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)
  # One identity only: no negatives, no loss.
  single = centre_triplet(jnp.asarray(z[:2]), jnp.asarray(labels[:2]), jnp.asarray(snapshot))
  np.testing.assert_array_equal(single, 0.0)
  # A row on its own centre: d+ = sqrt(1e-12) = 1e-6, not 0; the margin decides the rest.
  on_centre = np.stack([snapshot[0], snapshot[3]])
  value = centre_triplet(jnp.asarray(on_centre), jnp.asarray([0, 3], jnp.int32),
                         jnp.asarray(snapshot), margin=5.0)
  d_neg = np.linalg.norm(snapshot[0] - snapshot[3])
  np.testing.assert_allclose(value, 1e-6 - d_neg + 5.0, rtol=1e-5)


def make_teacher_batch(seed, n=4, dim=6, num_classes=5):
  rng = np.random.default_rng(seed)
  g_views = [rng.normal(size=(n, dim)).astype(np.float32) * 2 for _ in range(3)]
  labels = np.array([0, 0, 3, 3, 1, 1, 4, 4][:n], np.int32)
  memories = init_memories(*(jnp.asarray(random_unit(rng, num_classes, dim)) for _ in range(3)))
  # Let the current memories drift from the snapshots, as they do within an epoch.
  memories = memories.replace(visible=jnp.asarray(random_unit(rng, num_classes, dim)),
                              global_=memories.global_ * 1.1)
  return g_views, labels, memories


def test_teacher_loss_total_terms_and_gradient():
  g_views, labels, memories = make_teacher_batch(seed=3)
  args = [jnp.asarray(g) for g in g_views]
  loss, terms = teacher_loss(*args, jnp.asarray(labels), memories, TeacherSettings())
  np.testing.assert_allclose(loss, np_teacher_loss(*g_views, labels, memories), rtol=1e-5)
  weights = {"centre_triplet": 1.0, "memory_global": 1.0, "memory_visible": 1.0,
             "memory_infrared": 1.0, "memory_channel": 0.4, "modality_kl": 1.2}
  np.testing.assert_allclose(sum(w * terms[k] for k, w in weights.items()), loss, rtol=1e-6)
  grads = jax.jit(jax.grad(lambda *g: teacher_loss(*g, jnp.asarray(labels), memories,
                                                   TeacherSettings())[0], argnums=(0, 1, 2)))(
                                                       *args)
  frozen = [g.astype(np.float64) for g in g_views]
  for position, grad in enumerate(grads):
    def fn(x, position=position):
      views = list(frozen)
      views[position] = x
      return np_teacher_loss(*views, labels, memories, frozen=frozen)
    np.testing.assert_allclose(grad, numeric_grad(fn, frozen[position]), rtol=2e-3, atol=1e-4)


def test_teacher_settings_weights_are_applied_and_validated():
  g_views, labels, memories = make_teacher_batch(seed=4)
  args = [jnp.asarray(g) for g in g_views] + [jnp.asarray(labels), memories]
  _, terms = teacher_loss(*args, TeacherSettings())
  settings = TeacherSettings(weight_view=2.0, weight_channel=0.0, weight_kl=0.5,
                             weight_triplet=3.0, weight_global=0.25)
  loss, _ = teacher_loss(*args, settings)
  expected = (3.0 * terms["centre_triplet"] + 0.25 * terms["memory_global"]
              + 2.0 * (terms["memory_visible"] + terms["memory_infrared"])
              + 0.5 * terms["modality_kl"])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert dataclasses.astuple(TeacherSettings()) == (0.05, 1.0, 0.4, 1.2, 1.0, 1.0, 0.3)
  assert hash(TeacherSettings()) == hash(TeacherSettings())
  for field, value in (("memory_temperature", 0.0), ("weight_kl", -1.0),
                       ("triplet_margin", "0.3"), ("weight_view", True)):
    with pytest.raises(ValueError, match=field):
      TeacherSettings(**{field: value})
  with pytest.raises(ValueError, match="labels"):
    teacher_loss(*args[:3], jnp.zeros(3, jnp.int32), memories, TeacherSettings())


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from dakd_jax.losses.alignment import TeacherSettings, teacher_loss
    from dakd_jax.losses.memory import init_memories, unit_rows, update_memories

    rng = np.random.default_rng(0)
    n, dim, classes = 8, 16, 6
    g_views = [jnp.asarray(x, jnp.float32) for x in rng.normal(size=(3, n, dim))]
    labels = jnp.asarray(np.repeat(rng.choice(classes, 4, replace=False), 2), jnp.int32)
    memories = init_memories(*(unit_rows(x) for x in rng.normal(size=(3, classes, dim))))

    def step(g_v, g_i, g_a, labels, memories):
      fn = lambda *g: teacher_loss(*g, labels, memories, TeacherSettings())
      value, grads = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(g_v, g_i, g_a)
      z = [unit_rows(g) for g in (g_v, g_i, g_a)]
      return value, grads, update_memories(memories, *z, labels)

    reference = jax.jit(step)(*g_views, labels, memories)
    for axis_type in (AxisType.Explicit, AxisType.Auto):
      mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
      rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
      with jax.set_mesh(mesh):
        sharded = jax.jit(step)(*[jax.device_put(g, rows) for g in g_views],
                                jax.device_put(labels, rows),
                                jax.device_put(memories, replicated))
      assert len(sharded[1][0].sharding.device_set) == 4
      for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    print("SHARDED_OK")
    """)


def test_teacher_loss_and_memory_update_sharded_over_four_devices():
  assert "SHARDED_OK" in run_child(SHARDED_SCRIPT, 4, timeout=300)
