"""Tests for dakd_jax.data.sampler (method.md 5.1)."""
import collections

import numpy as np
import pytest

from dakd_jax.data import sampler


def make_split(counts_visible, counts_infrared, seed=0):
  """Shuffled training metadata with the given images per label and modality."""
  labels, modality = [], []
  for label, (nv, ni) in enumerate(zip(counts_visible, counts_infrared)):
    labels += [label] * (nv + ni)
    modality += [0] * nv + [1] * ni
  order = np.random.default_rng(seed).permutation(len(labels))
  return np.array(labels)[order], np.array(modality)[order]


def draw(step, labels, modality, seed=0, ids_per_batch=3, images_per_id=4):
  visible, infrared = sampler.make_modality_indices(labels, modality)
  return sampler.batch_indices(step, seed=seed, visible_by_label=visible,
                               infrared_by_label=infrared, ids_per_batch=ids_per_batch,
                               images_per_id=images_per_id)


def test_steps_per_epoch_matches_method():
  assert sampler.steps_per_epoch(22258, 11909, 8, 4) == 696
  assert sampler.steps_per_epoch(2060, 2060, 8, 5) == 52
  assert sampler.steps_per_epoch(10, 31, 2, 4) == 4  # floor(31 / 8) + 1
  assert sampler.steps_per_epoch(16, 3, 2, 4) == 3  # an exact multiple still adds one
  with pytest.raises(ValueError):
    sampler.steps_per_epoch(10, 10, 0, 4)


def test_label_index_groups_rows_like_a_dict():
  labels, modality = make_split([3, 1, 0, 5], [2, 2, 4, 1])
  visible, infrared = sampler.make_modality_indices(labels, modality)
  for code, index in ((0, visible), (1, infrared)):
    expected = collections.defaultdict(list)
    for row, (label, mod) in enumerate(zip(labels, modality)):
      if mod == code:
        expected[label].append(row)
    for label in range(4):
      assert index.counts[label] == len(expected[label])
      assert list(index.indices[label, :index.counts[label]]) == sorted(expected[label])
      assert (index.indices[label, index.counts[label]:] == -1).all()


def test_batch_layout_labels_and_modalities():
  labels, modality = make_split([3, 1, 4, 5, 2], [2, 2, 4, 1, 6])
  for step in range(50):
    visible, infrared, batch_labels = draw(step, labels, modality)
    assert visible.shape == infrared.shape == batch_labels.shape == (12,)
    assert batch_labels.dtype == np.int32
    blocks = batch_labels.reshape(3, 4)
    assert (blocks == blocks[:, :1]).all()  # identity-major: K equal labels per block
    assert len(set(blocks[:, 0])) == 3  # B distinct identities
    # Position j pairs a visible and an infrared image of the batch label at j.
    np.testing.assert_array_equal(labels[visible], batch_labels)
    np.testing.assert_array_equal(labels[infrared], batch_labels)
    assert (modality[visible] == 0).all() and (modality[infrared] == 1).all()


def test_deterministic_from_seed_and_step_alone():
  labels, modality = make_split([3, 2, 4, 5], [2, 3, 4, 2])
  sequence = [draw(step, labels, modality, seed=7) for step in range(10)]
  alone = draw(6, labels, modality, seed=7)  # drawn without the steps before it
  for a, b in zip(sequence[6], alone):
    np.testing.assert_array_equal(a, b)
  other_seed = draw(6, labels, modality, seed=8)
  assert any(not np.array_equal(a, b) for a, b in zip(alone, other_seed))
  assert any(not np.array_equal(sequence[0][0], s[0]) for s in sequence[1:])


def test_draws_are_uniform_with_replacement():
  # 4 labels, B = 2: each label is drawn in half of the batches. Label 0 has 2 visible images
  # and K = 4 draws, so duplicates must appear; every image of a label is equally likely.
  labels, modality = make_split([2, 3, 3, 3], [3, 2, 3, 3])
  steps = 4000
  label_hits = np.zeros(4)
  row_hits = collections.Counter()
  duplicate_batches = 0
  for step in range(steps):
    visible, infrared, batch_labels = draw(step, labels, modality, ids_per_batch=2)
    label_hits[np.unique(batch_labels)] += 1
    row_hits.update(visible.tolist())
    row_hits.update(infrared.tolist())
    block = visible[batch_labels == 0]
    duplicate_batches += block.size > 0 and len(set(block.tolist())) < block.size
  np.testing.assert_allclose(label_hits / steps, 0.5, atol=0.03)
  # P(4 draws from 2 images are not all distinct) = 1: every batch with label 0 repeats.
  assert duplicate_batches == label_hits[0]
  for label in range(4):
    for code in (0, 1):
      rows = np.flatnonzero((labels == label) & (modality == code))
      hits = np.array([row_hits[r] for r in rows], dtype=float)
      expected = label_hits[label] * 4 / len(rows)
      np.testing.assert_allclose(hits, expected, rtol=0.1)


def test_labels_missing_a_modality_are_never_drawn():
  labels, modality = make_split([3, 0, 2, 4], [2, 3, 2, 0])
  visible, infrared = sampler.make_modality_indices(labels, modality)
  np.testing.assert_array_equal(sampler.eligible_labels(visible, infrared), [0, 2])
  for step in range(30):
    _, _, batch_labels = draw(step, labels, modality, ids_per_batch=2)
    assert set(batch_labels.tolist()) == {0, 2}
  with pytest.raises(ValueError, match="only 2 training labels"):
    draw(0, labels, modality, ids_per_batch=3)


def test_one_epoch_covers_every_identity_for_seed_zero():
  # 12 labels, 120 images per modality, B*K = 8 -> 16 steps of 4 identities (64 draws).
  labels, modality = make_split([10] * 12, [10] * 12)
  steps = sampler.steps_per_epoch(120, 120, 4, 2)
  assert steps == 16
  seen = set()
  for step in range(steps):
    seen.update(draw(step, labels, modality, seed=0, ids_per_batch=4, images_per_id=2)[2].tolist())
  assert seen == set(range(12))


def test_rejects_test_split_metadata():
  with pytest.raises(ValueError, match="labels >= 0"):
    sampler.make_modality_indices(np.array([-1, -1]), np.array([0, 1]))
  with pytest.raises(ValueError, match="modality"):
    sampler.make_modality_indices(np.array([0, 0]), np.array([0, 2]))
