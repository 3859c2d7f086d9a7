"""Tests for dakd_jax.evaluation.metrics.rank_metrics (method.md 7.4, llcm.md 3.3).

The reference below is a deliberately plain per-query loop: a stable argsort, the SYSU camera
filter or the LLCM same-identity same-camera filter, an explicit list for the distinct-identity
collapse and the AP/INP formulas written out. The vectorised, chunked implementation must agree
with it exactly (up to float sums).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax.data.records import CameraRule
from dakd_jax.evaluation import rank_metrics


def slow_rank_metrics(distmat, query_ids, gallery_ids, query_cams, gallery_cams, protocol,
                      max_rank, dropped=None, distinct=None):
  """One query at a time; ties by gallery index (stable argsort). `dropped(i, g)` and
  `distinct` state another rule directly (default: the protocol's, written out here)."""
  distmat = np.asarray(distmat)
  hits = np.zeros(max_rank)
  average_precisions, inverse_precisions = [], []
  if dropped is None:
    dropped = lambda i, g: ((protocol == "sysu" and query_cams[i] == 3 and gallery_cams[g] == 2)
                            or (protocol == "llcm" and gallery_ids[g] == query_ids[i]
                                and gallery_cams[g] == query_cams[i]))
  distinct = protocol in ("sysu", "llcm") if distinct is None else distinct
  for i in range(distmat.shape[0]):
    ranked = [g for g in np.argsort(distmat[i], kind="stable") if not dropped(i, g)]
    positions = [p + 1 for p, g in enumerate(ranked) if gallery_ids[g] == query_ids[i]]
    if not positions:
      continue
    average_precisions.append(np.mean([j / p for j, p in enumerate(positions, start=1)]))
    inverse_precisions.append(len(positions) / positions[-1])
    if distinct:
      seen = []
      for g in ranked:
        if gallery_ids[g] not in seen:
          seen.append(gallery_ids[g])
      first_hit = seen.index(query_ids[i]) + 1
    else:
      first_hit = positions[0]
    for k in range(1, max_rank + 1):
      hits[k - 1] += first_hit <= k
  num_valid = len(average_precisions)
  return {"cmc": hits / num_valid, "mAP": np.mean(average_precisions),
          "mINP": np.mean(inverse_precisions), "num_valid_queries": num_valid}


def assert_same(result, expected):
  np.testing.assert_allclose(result["cmc"], expected["cmc"], rtol=0, atol=1e-12)
  assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
  assert result["mINP"] == pytest.approx(expected["mINP"], abs=1e-12)
  assert result["num_valid_queries"] == expected["num_valid_queries"]


def random_problem(seed, num_query=60, num_identities=12, images_per_camera=3, levels=None):
  """SYSU-like: queries from cameras 3 and 6, gallery from 1, 2, 4, 5, several images each.

  Some query identities are missing from the gallery, and some exist only in camera 2 (so
  their camera-3 queries lose every match). `levels` quantises distances to force ties.
  """
  rng = np.random.default_rng(seed)
  gallery_ids, gallery_cams = [], []
  for identity in range(num_identities):
    cameras = [2] if identity == 0 else [1, 2, 4, 5]
    for camera in cameras:
      count = int(rng.integers(1, images_per_camera + 1))
      gallery_ids += [identity] * count
      gallery_cams += [camera] * count
  gallery_ids, gallery_cams = np.array(gallery_ids), np.array(gallery_cams)
  shuffle = rng.permutation(gallery_ids.size)  # gallery not grouped by identity
  gallery_ids, gallery_cams = gallery_ids[shuffle], gallery_cams[shuffle]
  query_ids = rng.integers(0, num_identities + 2, num_query)  # ids 12, 13: never in gallery
  query_cams = rng.choice([3, 6], num_query)
  distmat = rng.normal(size=(num_query, gallery_ids.size))
  distmat -= 1.5 * (query_ids[:, None] == gallery_ids[None, :])  # matches tend to rank high
  if levels is not None:
    distmat = np.round(distmat * levels / 4) / levels
  return distmat.astype(np.float32), query_ids, gallery_ids, query_cams, gallery_cams


def llcm_problem(seed, num_query=60, num_identities=12, levels=None):
  """LLCM-like: both sides from cameras 1..9, each identity in a few cameras of the gallery.

  Half of the queries come from a camera where the gallery holds their identity (the filter
  drops those images); identity 0 is only in camera 5, so its camera-5 queries lose every match;
  ids 12 and 13 are never in the gallery.
  """
  rng = np.random.default_rng(seed)
  gallery_ids, gallery_cams, cameras_of = [], [], {}
  for identity in range(num_identities):
    cameras = [5] if identity == 0 else list(rng.choice(np.arange(1, 10), rng.integers(1, 4),
                                                        replace=False))
    cameras_of[identity] = cameras
    for camera in cameras:
      count = int(rng.integers(1, 4))
      gallery_ids += [identity] * count
      gallery_cams += [camera] * count
  gallery_ids, gallery_cams = np.array(gallery_ids), np.array(gallery_cams)
  shuffle = rng.permutation(gallery_ids.size)
  gallery_ids, gallery_cams = gallery_ids[shuffle], gallery_cams[shuffle]
  query_ids = rng.integers(0, num_identities + 2, num_query)
  query_ids[:4] = 0
  query_cams = rng.integers(1, 10, num_query)
  for i, identity in enumerate(query_ids):
    if identity in cameras_of and (i < 4 or rng.random() < 0.5):
      query_cams[i] = rng.choice(cameras_of[identity])
  distmat = rng.normal(size=(num_query, gallery_ids.size))
  distmat -= 1.5 * (query_ids[:, None] == gallery_ids[None, :])
  if levels is not None:
    distmat = np.round(distmat * levels / 4) / levels
  return distmat.astype(np.float32), query_ids, gallery_ids, query_cams, gallery_cams


def make_problem(protocol, seed, levels=None):
  return (llcm_problem if protocol == "llcm" else random_problem)(seed, levels=levels)


@pytest.mark.parametrize("protocol", ["sysu", "regdb", "llcm"])
@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 3), (3, 1)])
def test_matches_slow_reference(protocol, seed, levels):
  distmat, query_ids, gallery_ids, query_cams, gallery_cams = make_problem(protocol, seed, levels)
  expected = slow_rank_metrics(distmat, query_ids, gallery_ids, query_cams, gallery_cams,
                               protocol, 20)
  result = rank_metrics(distmat, query_ids, gallery_ids, query_cams, gallery_cams,
                        protocol=protocol)
  assert_same(result, expected)
  # The problem really has invalid queries on both protocols.
  assert result["num_valid_queries"] < distmat.shape[0]
  assert result["cmc"].shape == (20,) and result["cmc"].dtype == np.float64


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.uint8])
@pytest.mark.parametrize("protocol", ["sysu", "regdb", "llcm"])
def test_other_dtypes_with_ties(dtype, protocol):
  distmat, query_ids, gallery_ids, query_cams, gallery_cams = make_problem(protocol, 4, 2)
  distmat = (distmat * 4 + 20).astype(dtype)  # small integers: many ties in every dtype
  expected = slow_rank_metrics(distmat, query_ids, gallery_ids, query_cams, gallery_cams,
                               protocol, 10)
  result = rank_metrics(distmat, query_ids, gallery_ids, query_cams, gallery_cams,
                        protocol=protocol, max_rank=10)
  assert_same(result, expected)


@pytest.mark.parametrize("protocol", ["sysu", "regdb", "llcm"])
def test_chunked_equals_unchunked(protocol):
  distmat, query_ids, gallery_ids, query_cams, gallery_cams = make_problem(protocol, 5, 2)
  args = (distmat, query_ids, gallery_ids, query_cams, gallery_cams)
  whole = rank_metrics(*args, protocol=protocol, query_chunk_size=distmat.shape[0])
  for chunk in (1, 7):
    assert_same(rank_metrics(*args, protocol=protocol, query_chunk_size=chunk), whole)
  # A tiny budget: one query per chunk and one tied match per tie-resolution block.
  assert_same(rank_metrics(*args, protocol=protocol, memory_budget_bytes=1), whole)


def test_sysu_hand_computed():
  # Gallery (index: identity, camera, distance to query 0 / query 1):
  #   0: B cam1 0.1/0.1   1: A cam2 0.2/0.2   2: B cam4 0.3/0.3
  #   3: C cam5 0.4/0.4   4: A cam1 0.5/0.5   5: A cam4 0.6/0.6
  # Query 0 = A from camera 3: gallery 1 (camera 2) is dropped. Kept ranking B B C A A:
  #   A at positions 4, 5 -> AP = (1/4 + 2/5) / 2 = 0.325, INP = 2/5 = 0.4;
  #   distinct identities B, C, A -> CMC rank 3.
  # Query 1 = A from camera 6, nothing dropped. Ranking B A B C A A: A at 2, 5, 6
  #   -> AP = (1/2 + 2/5 + 3/6) / 3 = 1.4/3, INP = 3/6 = 0.5; distinct B, A -> rank 2.
  # Query 2 = D from camera 6: no match, left out.
  row = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
  distmat = np.array([row, row, row], np.float32)
  result = rank_metrics(distmat, ["A", "A", "D"], ["B", "A", "B", "C", "A", "A"], [3, 6, 6],
                        [1, 2, 4, 5, 1, 4], protocol="sysu", max_rank=5)
  assert result["num_valid_queries"] == 2
  # CMC@k: k=1: none; k=2: query 1; k>=3: both.
  np.testing.assert_allclose(result["cmc"], [0.0, 0.5, 1.0, 1.0, 1.0])
  assert result["mAP"] == pytest.approx((0.325 + 1.4 / 3) / 2)
  assert result["mINP"] == pytest.approx((0.4 + 0.5) / 2)


def test_regdb_hand_computed():
  # Gallery identities B A B C A A; cameras are ignored on RegDB (even camera 3 -> 2).
  # Query 0 = A, distances 0.1..0.6: ranking B A B C A A, A at 2, 5, 6
  #   -> AP = (1/2 + 2/5 + 3/6) / 3 = 1.4/3, INP = 0.5, first hit at 2.
  # Query 1 = C, distances 0.1 0.2 0.3 0.9 0.4 0.5: ranking B A B A A C, C at 6
  #   -> AP = INP = 1/6; first hit at 6 (no collapse: SYSU's rule would give 3).
  distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                      [0.1, 0.2, 0.3, 0.9, 0.4, 0.5]], np.float32)
  result = rank_metrics(distmat, [10, 30], [20, 10, 20, 30, 10, 10], [3, 3],
                        [2, 2, 2, 2, 2, 2], protocol="regdb", max_rank=6)
  np.testing.assert_allclose(result["cmc"], [0.0, 0.5, 0.5, 0.5, 0.5, 1.0])
  assert result["mAP"] == pytest.approx((1.4 / 3 + 1 / 6) / 2)
  assert result["mINP"] == pytest.approx((0.5 + 1 / 6) / 2)
  assert result["num_valid_queries"] == 2


def test_llcm_problem_exercises_the_filter():
  # The random LLCM problems above really drop images, and really lose queries to the filter
  # alone (their identity is in the gallery, only in their own camera).
  for seed in range(7):
    _, query_ids, gallery_ids, query_cams, gallery_cams = llcm_problem(seed)
    dropped = ((query_ids[:, None] == gallery_ids[None, :])
               & (query_cams[:, None] == gallery_cams[None, :]))
    kept_matches = (query_ids[:, None] == gallery_ids[None, :]) & ~dropped
    assert (dropped.any(axis=1) & kept_matches.any(axis=1)).sum() >= 5
    assert (dropped.any(axis=1) & ~kept_matches.any(axis=1)).sum() >= 1


def test_llcm_hand_computed():
  # Gallery (index: identity, camera), distance 0.1 .. 0.6 for every query:
  #   0: A cam1   1: B cam1   2: A cam2   3: B cam2   4: A cam1   5: C cam3
  # Query 0 = A cam1: gallery 0 and 4 (A, cam1) dropped; B cam1 (same camera, other identity)
  #   stays. Kept ranking B A B C: A at 2 -> AP = 1/2, INP = 1/2; distinct B, A -> rank 2.
  #   (A camera-only filter would give rank 1; no filter AP = (1 + 2/3 + 3/5) / 3.)
  # Query 1 = A cam3: nothing dropped. A B A B A C: A at 1, 3, 5 -> AP = (1 + 2/3 + 3/5) / 3,
  #   INP = 3/5, rank 1.
  # Query 2 = C cam3: its only image is dropped -> no match left, skipped.
  # Query 3 = B cam2: gallery 3 dropped. A B A A C: B at 2 -> AP = INP = 1/2; distinct A, B ->
  #   rank 2.
  row = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
  result = rank_metrics(np.array([row] * 4, np.float32), ["A", "A", "C", "B"],
                        ["A", "B", "A", "B", "A", "C"], [1, 3, 3, 2], [1, 1, 2, 2, 1, 3],
                        protocol="llcm", max_rank=4)
  assert result["num_valid_queries"] == 3
  np.testing.assert_allclose(result["cmc"], [1 / 3, 1.0, 1.0, 1.0])
  assert result["mAP"] == pytest.approx((0.5 + (1 + 2 / 3 + 3 / 5) / 3 + 0.5) / 3)
  assert result["mINP"] == pytest.approx((0.5 + 0.6 + 0.5) / 3)


def test_ties_rank_by_gallery_index():
  # Gallery B A A at 0.5 0.5 0.2: ranking 2 (A), then the tie 0 (B) before 1 (A).
  # A at positions 1, 3 -> AP = (1/1 + 2/3) / 2 = 5/6, INP = 2/3 (the other tie order
  # would give AP = 1, INP = 1).
  result = rank_metrics(np.array([[0.5, 0.5, 0.2]]), [1], [2, 1, 1], protocol="regdb",
                        max_rank=3)
  assert result["mAP"] == pytest.approx(5 / 6)
  assert result["mINP"] == pytest.approx(2 / 3)
  # -0.0 equals +0.0: B at index 0 stays first, A second -> AP = INP = 1/2, rank 2.
  result = rank_metrics(np.array([[0.0, -0.0]], np.float32), [1], [2, 1], protocol="regdb",
                        max_rank=2)
  assert result["mAP"] == pytest.approx(0.5)
  np.testing.assert_allclose(result["cmc"], [0.0, 1.0])
  # SYSU distinct rank with a tie at the first match: B (index 0), A (1), C (2) all at 0.5
  # -> collapsed list B A C -> rank 2.
  result = rank_metrics(np.array([[0.5, 0.5, 0.5]]), [1], [2, 1, 3], [6], [1, 1, 4],
                        protocol="sysu", max_rank=3)
  np.testing.assert_allclose(result["cmc"], [0.0, 1.0, 1.0])


def test_max_rank_beyond_gallery_continues_curve():
  # Three distinct gallery identities, query found at distinct rank 2: CMC is 0, then 1 for
  # every further rank (the baseline would clamp max_rank to the gallery size).
  result = rank_metrics(np.array([[0.1, 0.2, 0.3, 0.4]]), [1], [2, 1, 3, 1], [6], [1, 4, 5, 1],
                        protocol="sysu", max_rank=8)
  np.testing.assert_allclose(result["cmc"], [0.0] + [1.0] * 7)


@pytest.mark.parametrize("protocol", ["sysu", "regdb", "llcm"])
def test_invariant_to_gallery_permutation_without_ties(protocol):
  distmat, query_ids, gallery_ids, query_cams, gallery_cams = make_problem(protocol, 6)
  assert len(np.unique(distmat)) == distmat.size  # no ties
  before = rank_metrics(distmat, query_ids, gallery_ids, query_cams, gallery_cams,
                        protocol=protocol)
  perm = np.random.default_rng(7).permutation(gallery_ids.size)
  after = rank_metrics(distmat[:, perm], query_ids, gallery_ids[perm], query_cams,
                       gallery_cams[perm], protocol=protocol)
  np.testing.assert_allclose(after["cmc"], before["cmc"], atol=1e-12)
  assert after["mAP"] == pytest.approx(before["mAP"], abs=1e-12)
  assert after["mINP"] == pytest.approx(before["mINP"], abs=1e-12)


def test_jax_and_memmap_inputs(tmp_path):
  distmat, query_ids, gallery_ids, query_cams, gallery_cams = random_problem(8, levels=3)
  args = (query_ids, gallery_ids, query_cams, gallery_cams)
  expected = rank_metrics(distmat, *args, protocol="sysu")
  assert_same(rank_metrics(jnp.asarray(distmat), *args, protocol="sysu"), expected)
  stored = np.memmap(tmp_path / "distmat.f32", np.float32, "w+", shape=distmat.shape)
  stored[:] = distmat
  assert_same(rank_metrics(stored, *args, protocol="sysu", query_chunk_size=5), expected)


def test_bad_inputs():
  distmat = np.zeros((2, 3), np.float32)
  ids_q, ids_g, cams_q, cams_g = [1, 2], [1, 2, 2], [3, 6], [1, 2, 4]
  cases = [
      (dict(protocol="market"), "protocol"),
      (dict(protocol="regdb", max_rank=0), "max_rank"),
      (dict(protocol="regdb", max_rank=True), "max_rank"),
      (dict(protocol="regdb", max_rank=2.0), "max_rank"),
      (dict(protocol="regdb", query_chunk_size=0), "query_chunk_size"),
      (dict(protocol="regdb", memory_budget_bytes=0), "memory_budget_bytes"),
  ]
  for kwargs, word in cases:
    with pytest.raises(ValueError, match=word):
      rank_metrics(distmat, ids_q, ids_g, cams_q, cams_g, **kwargs)
  with pytest.raises(ValueError, match="distmat must be"):
    rank_metrics(np.zeros(3), ids_q, ids_g, protocol="regdb")
  with pytest.raises(ValueError, match="distmat must be"):
    rank_metrics(np.zeros((0, 3)), [], ids_g, protocol="regdb")
  with pytest.raises(ValueError, match="query_ids"):
    rank_metrics(distmat, [1, 2, 3], ids_g, protocol="regdb")
  with pytest.raises(ValueError, match="gallery_ids"):
    rank_metrics(distmat, ids_q, [1, 2], protocol="regdb")
  with pytest.raises(ValueError, match="needs query_cams"):
    rank_metrics(distmat, ids_q, ids_g, protocol="sysu")
  with pytest.raises(ValueError, match="'llcm' needs gallery_cams"):
    rank_metrics(distmat, ids_q, ids_g, cams_q, protocol="llcm")
  with pytest.raises(ValueError, match="gallery_cams"):
    rank_metrics(distmat, ids_q, ids_g, cams_q, [1, 2], protocol="sysu")
  with pytest.raises(ValueError, match="integer camera"):
    rank_metrics(distmat, ids_q, ids_g, [3.0, 6.0], cams_g, protocol="sysu")
  with pytest.raises(ValueError, match="query_cams"):
    rank_metrics(distmat, ids_q, ids_g, [3], cams_g, protocol="regdb")
  with pytest.raises(TypeError, match="real numbers"):
    rank_metrics(distmat.astype(bool), ids_q, ids_g, protocol="regdb")
  with pytest.raises(TypeError, match="real numbers"):
    rank_metrics(distmat.astype(complex), ids_q, ids_g, protocol="regdb")
  bad = distmat.copy()
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="NaN in query row 1"):
    rank_metrics(bad, ids_q, ids_g, protocol="regdb")
  with pytest.raises(ValueError, match="no query has a true match"):
    rank_metrics(distmat, [7, 8], ids_g, protocol="regdb")
  # SYSU: the only match of a camera-3 query is in camera 2 -> no valid query.
  with pytest.raises(ValueError, match="no query has a true match"):
    rank_metrics(distmat[:1], [2], [1, 2, 3], [3], [1, 2, 4], protocol="sysu")
  # LLCM: the only match is in the query's own camera -> no valid query.
  with pytest.raises(ValueError, match="no query has a true match"):
    rank_metrics(distmat[:1], [2], [1, 2, 3], [4], [1, 4, 4], protocol="llcm")


@pytest.mark.parametrize("distinct", [False, True])
def test_a_new_datasets_camera_rule_is_ranked_without_changes_to_the_metrics(distinct):
  """A fourth dataset declares its rule (two camera pairs, the same-identity same-camera filter,
  either CMC) and rank_metrics follows it: checked against a one-query-at-a-time loop."""
  rule = CameraRule("fourth", removed_camera_pairs=((3, 2), (6, 4)),
                    removes_same_identity_same_camera=True, distinct_identity_cmc=distinct)
  distmat, query_ids, gallery_ids, query_cams, gallery_cams = random_problem(5, levels=6)
  gallery_cams = np.where(np.arange(gallery_cams.size) % 5 == 0, 3, gallery_cams)
  max_rank = 8
  expected = slow_rank_metrics(
      distmat, query_ids, gallery_ids, query_cams, gallery_cams, None, max_rank,
      dropped=lambda i, g: ((query_cams[i] == 3 and gallery_cams[g] == 2)
                            or (query_cams[i] == 6 and gallery_cams[g] == 4)
                            or (gallery_ids[g] == query_ids[i]
                                and gallery_cams[g] == query_cams[i])),
      distinct=distinct)
  result = rank_metrics(distmat, query_ids, gallery_ids, query_cams, gallery_cams,
                        protocol=rule, max_rank=max_rank, query_chunk_size=7)
  assert_same(result, expected)
  removed = rule.removed_pairs(query_ids, query_cams, gallery_ids, gallery_cams)
  assert removed[query_cams == 6][:, gallery_cams == 4].all()
  assert not removed[query_cams == 3][:, gallery_cams == 4].any()
