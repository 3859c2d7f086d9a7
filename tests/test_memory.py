"""Tests of dakd_jax.losses.memory against per-class NumPy loops (method.md 3.2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax.losses.memory import (CentreMemories, build_centres, init_memories, unit_rows,
                                    update_memories)

VIEWS = ("visible", "infrared", "channel")


def np_unit(vector):
  return vector / max(np.linalg.norm(vector), 1e-12)


def random_unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def np_build_centres(embeddings, labels, num_classes):
  centres = np.zeros((num_classes, embeddings.shape[1]))
  for c in range(num_classes):
    rows = embeddings[labels == c].astype(np.float64)
    if len(rows):
      centres[c] = np_unit(rows.mean(axis=0))
  return centres


def np_update(memories, z_views, labels):
  """The reference's update, one class at a time, cosine computed with the normalised M[c]."""
  new = {name: np.array(getattr(memories, name), np.float64)
         for name in ("global_",) + VIEWS}
  old_global = np.asarray(memories.global_, np.float64)
  stacked = np.concatenate(z_views).astype(np.float64)
  stacked_labels = np.concatenate([labels] * 3)
  for c in sorted(set(labels.tolist())):
    rows = [k for k in range(len(stacked)) if stacked_labels[k] == c]
    cosines = [stacked[k] @ np_unit(old_global[c]) for k in rows]
    hard = rows[int(np.argmin(cosines))]
    new["global_"][c] = np_unit(0.1 * old_global[c] + 0.9 * stacked[hard])
    for name, z in zip(VIEWS, z_views):
      old = np.asarray(getattr(memories, name), np.float64)[c]
      new[name][c] = np_unit(0.25 * old + 0.75 * z[labels == c].astype(np.float64).mean(axis=0))
  return new


def test_unit_rows_normalises_and_keeps_zero_rows():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [-1e-3, 0.0]], np.float32)
  np.testing.assert_allclose(unit_rows(x), [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], rtol=1e-6)


def test_build_centres_matches_per_class_loop_and_zeroes_empty_classes():
  rng = np.random.default_rng(0)
  embeddings = random_unit(rng, 20, 8)
  labels = rng.choice([0, 1, 3, 4, 6], size=20).astype(np.int32)  # classes 2 and 5 empty
  labels[:5] = [0, 1, 3, 4, 6]
  centres = build_centres(jnp.asarray(embeddings), jnp.asarray(labels), 7)
  assert centres.dtype == jnp.float32 and centres.shape == (7, 8)
  np.testing.assert_allclose(centres, np_build_centres(embeddings, labels, 7), atol=1e-6)
  np.testing.assert_array_equal(centres[2], 0.0)
  np.testing.assert_array_equal(centres[5], 0.0)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(centres)[[0, 1, 3, 4, 6]], axis=1), 1.0,
                             rtol=1e-6)


def make_memories(rng, num_classes=7, dim=8):
  return init_memories(*(jnp.asarray(random_unit(rng, num_classes, dim)) for _ in VIEWS))


def test_init_memories_averages_without_renormalising():
  rng = np.random.default_rng(1)
  centres = [random_unit(rng, 5, 8) for _ in VIEWS]
  memories = init_memories(*(jnp.asarray(c) for c in centres))
  expected_global = (centres[0].astype(np.float64) + centres[1] + centres[2]) / 3
  np.testing.assert_allclose(memories.global_, expected_global, rtol=1e-6)
  assert np.all(np.linalg.norm(np.asarray(memories.global_), axis=1) < 0.99)
  for name, c in zip(VIEWS, centres):
    np.testing.assert_array_equal(getattr(memories, name), c)
    np.testing.assert_array_equal(getattr(memories, "snapshot_" + name), c)
  np.testing.assert_array_equal(memories.snapshot_global, memories.global_)
  assert len(jax.tree.leaves(memories)) == 8
  with pytest.raises(ValueError, match="one shape"):
    init_memories(jnp.zeros((5, 8)), jnp.zeros((5, 8)), jnp.zeros((4, 8)))


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_update_memories_matches_per_class_loop(seed):
  rng = np.random.default_rng(seed)
  memories = make_memories(rng)
  memories = memories.replace(global_=memories.global_ * 0.7)  # M[c] need not be unit
  labels = np.repeat(rng.choice(7, size=3, replace=False), 3).astype(np.int32)  # B=3, K=3
  z_views = [random_unit(rng, 9, 8) for _ in VIEWS]
  updated = jax.jit(update_memories)(memories, *(jnp.asarray(z) for z in z_views),
                                     jnp.asarray(labels))
  expected = np_update(memories, z_views, labels)
  for name in ("global_",) + VIEWS:
    np.testing.assert_allclose(getattr(updated, name), expected[name], atol=2e-6, err_msg=name)
  absent = sorted(set(range(7)) - set(labels.tolist()))
  for name in ("global_",) + VIEWS:
    np.testing.assert_array_equal(np.asarray(getattr(updated, name))[absent],
                                  np.asarray(getattr(memories, name))[absent])
    snapshot = "snapshot_" + name.rstrip("_")
    np.testing.assert_array_equal(getattr(updated, snapshot), getattr(memories, snapshot))


def test_hard_update_picks_the_least_similar_row_from_any_view():
  memory_row = np.array([1.0, 0.0, 0.0], np.float32)
  memories = init_memories(*(jnp.asarray(np.stack([memory_row, [0, 1.0, 0]])) for _ in VIEWS))
  aligned = np.array([[1.0, 0.0, 0.0]], np.float32)
  sideways = np_unit(np.array([0.2, 0.0, 1.0])).astype(np.float32)[None]
  opposite = np_unit(np.array([-0.5, 1.0, 0.0])).astype(np.float32)[None]
  labels = jnp.zeros(1, jnp.int32)
  for z_views, hard in (((aligned, opposite, sideways), opposite),
                        ((sideways, aligned, opposite), opposite),
                        ((opposite, sideways, aligned), opposite),
                        ((aligned, sideways, aligned), sideways)):
    updated = update_memories(memories, *(jnp.asarray(z) for z in z_views), labels)
    np.testing.assert_allclose(updated.global_[0], np_unit(0.1 * memory_row + 0.9 * hard[0]),
                               atol=1e-6)
    np.testing.assert_array_equal(updated.global_[1], memories.global_[1])


def test_update_memories_momenta_are_keywords_and_shapes_are_checked():
  rng = np.random.default_rng(5)
  memories = make_memories(rng, num_classes=3, dim=4)
  z = jnp.asarray(random_unit(rng, 2, 4))
  labels = jnp.asarray([1, 1], jnp.int32)
  updated = update_memories(memories, z, z, z, labels, hard_momentum=0.0, mean_momentum=1.0)
  # Momentum 1 keeps only the (re-normalised) old row; momentum 0 takes the hard row itself.
  np.testing.assert_allclose(updated.visible[1], memories.visible[1], atol=1e-6)
  cosines = np.asarray(z) @ np.asarray(memories.global_[1])
  np.testing.assert_allclose(updated.global_[1], np.asarray(z)[np.argmin(cosines)], atol=1e-6)
  with pytest.raises(ValueError, match="labels"):
    update_memories(memories, z, z, z, jnp.asarray([1, 1, 1], jnp.int32))
  assert isinstance(updated, CentreMemories)
