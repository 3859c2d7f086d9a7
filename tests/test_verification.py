"""Tests for dakd_jax.evaluation.verification (TPR at fixed FPR, ROC points).

`slow_best_tpr` is the obviously correct definition: list every kept pair, try every threshold
"accept distance <= t" for t in the distinct distances (and "accept nothing"), and keep the
largest one whose FPR is at most the target (its TPR is the largest such TPR).
"""
import numpy as np
import pytest

from dakd_jax.evaluation import metrics
from dakd_jax.evaluation import verification


def slow_best_tpr(distmat, query_ids, gallery_ids, removed, target):
  pairs = [(float(distmat[q, g]), query_ids[q] == gallery_ids[g])
           for q in range(distmat.shape[0]) for g in range(distmat.shape[1])
           if removed is None or not removed[q, g]]
  num_positive = sum(1 for _, same in pairs if same)
  num_negative = len(pairs) - num_positive
  best = (0.0, 0.0)  # accept nothing
  for threshold in sorted({d for d, _ in pairs}):
    tp = sum(1 for d, same in pairs if same and d <= threshold)
    fp = sum(1 for d, same in pairs if not same and d <= threshold)
    if fp / num_negative <= target:
      assert tp / num_positive >= best[0]  # TPR grows with the threshold
      best = (tp / num_positive, fp / num_negative)
  return best


def test_hand_worked_case_with_ties():
  # 2 queries x 3 gallery; ids q = [1, 2], g = [1, 2, 3].
  # Pairs: positives (0,0) d=0.1, (1,1) d=0.3; negatives (0,1) 0.3, (0,2) 0.5, (1,0) 0.2,
  # (1,2) 0.3. Negatives sorted: 0.2, 0.3, 0.3, 0.5 (4 of them).
  distmat = np.array([[0.1, 0.3, 0.5], [0.2, 0.3, 0.3]], np.float32)
  out = verification.tpr_at_fpr(distmat, [1, 2], [1, 2, 3], fprs=(0.0, 0.25, 0.5, 0.74, 1.0))
  # f = 0: no negative may pass: tau = 0.2, only d = 0.1 is accepted -> TPR 1/2, FPR 0.
  # f = 0.25: one negative allowed: tau = 0.3 (the 2nd negative); accepting d < 0.3 takes
  #   0.1 and the negative 0.2 -> TPR 1/2, FPR 1/4. The positive at 0.3 is tied with two
  #   negatives: accepting it would give FPR 3/4.
  # f = 0.5: two negatives allowed, but the 2nd and 3rd are tied at 0.3: still tau = 0.3.
  # f = 0.74: m = 2 -> tau = 0.3 again; f = 1: all accepted.
  np.testing.assert_allclose(out["tpr"], [0.5, 0.5, 0.5, 0.5, 1.0])
  np.testing.assert_allclose(out["fpr"], [0.0, 0.25, 0.25, 0.25, 1.0])
  np.testing.assert_allclose(out["threshold"], [0.2, np.float32(0.3), np.float32(0.3),
                                                np.float32(0.3), np.inf])
  assert out["num_positive"] == 2 and out["num_negative"] == 4
  assert out["summary"]["TPR@FPR=0.25"] == 0.5 and out["summary"]["TPR@FPR=1"] == 1.0
  # Removing the pair (1, 2) leaves negatives 0.2, 0.3, 0.5: f = 1/3 now admits 0.2 only
  # (tau = 0.3), f = 2/3 admits 0.2 and 0.3 (tau = 0.5) and with it the positive at 0.3.
  removed = np.array([[False, False, False], [False, False, True]])
  out = verification.tpr_at_fpr(distmat, [1, 2], [1, 2, 3], fprs=(1 / 3, 2 / 3),
                                removed=removed)
  np.testing.assert_allclose(out["tpr"], [0.5, 1.0])
  np.testing.assert_allclose(out["fpr"], [1 / 3, 2 / 3])


@pytest.mark.parametrize("seed,quantised", [(0, False), (1, True), (2, True)])
def test_matches_threshold_sweep(seed, quantised):
  rng = np.random.default_rng(seed)
  query_ids, gallery_ids = rng.integers(0, 5, 17), rng.integers(0, 6, 23)
  same = query_ids[:, None] == gallery_ids[None, :]
  distmat = rng.normal(size=same.shape) + np.where(same, -1.0, 0.0)
  if quantised:  # many exact ties between positives and negatives
    distmat = np.round(distmat * 3) / 3
  distmat = distmat.astype(np.float32)
  cams_q, cams_g = rng.choice([3, 6], 17), rng.choice([1, 2, 4, 5], 23)
  for removed in (None, metrics.removed_pairs("sysu", query_ids, cams_q, gallery_ids, cams_g)):
    targets = (0.0, 0.004, 0.01, 0.05, 0.1, 0.3, 0.77, 1.0)
    out = verification.tpr_at_fpr(distmat, query_ids, gallery_ids, fprs=targets,
                                  removed=removed)
    for target, tpr, fpr in zip(targets, out["tpr"], out["fpr"]):
      expected_tpr, expected_fpr = slow_best_tpr(distmat, query_ids, gallery_ids, removed,
                                                 target)
      assert tpr == pytest.approx(expected_tpr) and fpr == pytest.approx(expected_fpr)
      assert fpr <= target
    # Threshold semantics: counting d < tau by brute force gives the reported rates.
    kept = np.ones_like(same) if removed is None else ~removed
    for tau, tpr, fpr in zip(out["threshold"], out["tpr"], out["fpr"]):
      assert np.sum((distmat < tau) & same & kept) / np.sum(same & kept) == tpr
      assert np.sum((distmat < tau) & ~same & kept) / np.sum(~same & kept) == fpr


def test_roc_points_are_monotone_exact_and_span_the_curve():
  rng = np.random.default_rng(3)
  query_ids, gallery_ids = rng.integers(0, 8, 40), rng.integers(0, 8, 50)
  distmat = rng.normal(size=(40, 50)) - 1.5 * (query_ids[:, None] == gallery_ids[None, :])
  curve = verification.roc_curve(distmat, query_ids, gallery_ids, num_points=30)
  assert np.all(np.diff(curve["fpr"]) >= 0) and np.all(np.diff(curve["tpr"]) >= 0)
  assert curve["fpr"][0] == 0.0 and curve["fpr"][-1] == 1.0 and curve["tpr"][-1] == 1.0
  assert curve["fpr_targets"][1] == pytest.approx(1 / curve["num_negative"])
  same = query_ids[:, None] == gallery_ids[None, :]
  for target, tpr in list(zip(curve["fpr_targets"], curve["tpr"]))[::7]:
    assert tpr == pytest.approx(slow_best_tpr(distmat, query_ids, gallery_ids, None, target)[0])
  # The positive distances are smaller on average: the curve lies above the diagonal.
  assert np.mean(curve["tpr"][1:] - curve["fpr"][1:]) > 0.1 and same.any()


def test_chunked_reading_equals_one_block_and_accepts_jax_arrays():
  import jax.numpy as jnp
  rng = np.random.default_rng(4)
  query_ids, gallery_ids = rng.integers(0, 4, 30), rng.integers(0, 4, 20)
  distmat = rng.random((30, 20)).astype(np.float32)
  one = verification.sorted_pair_distances(distmat, query_ids, gallery_ids)
  chunked = verification.sorted_pair_distances(jnp.asarray(distmat), query_ids, gallery_ids,
                                               chunk_bytes=8 * 20 * 3)  # 3 rows at a time
  for a, b in zip(one, chunked):
    np.testing.assert_array_equal(a, b)


def test_removed_pairs_follow_each_datasets_rule():
  ids_q, cams_q, ids_g, cams_g = [1, 2, 1], [3, 6, 3], [1, 1, 2, 5], [1, 2, 2, 3]
  removed = metrics.removed_pairs("sysu_mm01", ids_q, cams_q, ids_g, cams_g)
  np.testing.assert_array_equal(removed, [[0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]])
  assert not metrics.removed_pairs("regdb", ids_q, cams_q, ids_g, cams_g).any()
  # LLCM: the query's own identity seen by the query's own camera.
  np.testing.assert_array_equal(metrics.removed_pairs("llcm", ids_q, cams_q, ids_g, cams_g),
                                [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(metrics.removed_pairs("llcm", [5], [3], ids_g[:3] + [5], cams_g),
                                [[0, 0, 0, 1]])


@pytest.mark.parametrize("call,message", [
    (lambda d: verification.tpr_at_fpr(d, [1, 2], [1, 2, 3], fprs=(1.5,)), "rates in"),
    (lambda d: verification.tpr_at_fpr(d, [1, 2, 3], [1, 2, 3]), "query_ids must be 1-D"),
    (lambda d: verification.tpr_at_fpr(d, [1, 2], [4, 5, 6]), "0 positive"),
    (lambda d: verification.tpr_at_fpr(np.where(d > 0.4, np.nan, d), [1, 2], [1, 2, 3]),
     "query row 0"),
    (lambda d: verification.tpr_at_fpr(d, [1, 2], [1, 2, 3], removed=np.ones((3, 2), bool)),
     "removed must be a bool mask"),
    (lambda d: metrics.removed_pairs("sysu_mm01_typo", [1], [3], [1], [2]), "expected one of"),
])
def test_bad_input_raises_one_clear_error(call, message):
  distmat = np.array([[0.1, 0.3, 0.5], [0.2, 0.3, 0.3]], np.float32)
  with pytest.raises(ValueError, match=message):
    call(distmat)
