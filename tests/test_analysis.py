"""Analysis pictures (dakd_jax/evaluation/analysis.py), read back from their pixels: the
embedding map's markers (colour per identity, circle vs square per modality, placement), the
distance histograms' counts against a pair loop and their bar colours, the ROC dots."""
import sys

import numpy as np
import pytest
from PIL import Image

from dakd_jax.evaluation import analysis, verification

WHITE = np.array([255, 255, 255])


def read(path):
  return np.asarray(Image.open(path).convert("RGB")).astype(int)


def planar_embeddings():
  """4 identities x 2 modalities at known positions of a plane inside 5-D.

  Returns (embeddings [8, 5], identities, modalities, plane positions [8, 2])."""
  positions = np.array([[0, 0], [0, 1], [3, 0], [3, 1], [0, 4], [0, 5], [3, 4], [3, 5]], float)
  identities = np.array([7, 7, 8, 8, 9, 9, 4, 4])
  modalities = np.array([0, 1] * 4)
  basis = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 2)))[0].T  # orthonormal rows
  return 0.1 * positions @ basis, identities, modalities, positions


def test_pca_map_places_colours_and_shapes_markers(tmp_path):
  embeddings, identities, modalities, positions = planar_embeddings()
  out = analysis.embedding_picture(embeddings, identities, modalities,
                                   str(tmp_path / "map.png"), method="pca", marker_size=144)
  picture = read(out["path"])
  # PCA of points on a plane is an isometry of the plane: pairwise distances are kept.
  def pairwise(x):
    return np.linalg.norm(x[:, None] - x[None, :], axis=-1)
  np.testing.assert_allclose(pairwise(out["coordinates"]), pairwise(0.1 * positions), atol=1e-9)
  # Pixels follow the coordinates: x to the right, y upwards (coordinates differ by >= 0.1
  # or not at all).
  for axis, sign in ((0, 1), (1, -1)):
    values, pixels = out["coordinates"][:, axis], out["pixels"][:, axis]
    apart = np.abs(values[:, None] - values[None, :]) > 0.05
    assert np.all(np.sign(pixels[:, None] - pixels[None, :])[apart]
                  == sign * np.sign(values[:, None] - values[None, :])[apart])
    assert np.all(np.abs(pixels[:, None] - pixels[None, :])[~apart] <= 1)
  # One colour per identity, distinct between identities.
  colours = {ident: tuple(c) for ident, c in zip(out["identities"], out["colours"])}
  assert len(set(colours.values())) == 4
  for ident, colour in zip(out["identities"], out["colours"]):
    assert tuple(colour) == colours[ident]
  # At each marker centre the identity's colour; at a diagonal offset of 0.42 marker widths
  # (outside a circle of that width, inside a square) white for visible, colour for infrared.
  offset = int(round(0.42 * out["marker_width_px"]))
  for (column, row), colour, modality in zip(out["pixels"], out["colours"],
                                             out["modalities"]):
    assert np.abs(picture[row, column] - colour).max() <= 2, (column, row)
    for dx, dy in ((offset, offset), (-offset, offset), (offset, -offset), (-offset, -offset)):
      corner = picture[row + dy, column + dx]
      expected = colour if modality == 1 else WHITE
      assert np.abs(corner - expected).max() <= 2, (modality, dx, dy)


def test_tsne_is_seeded_and_keeps_identity_clusters(tmp_path):
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(5, 16)) * 3
  identities = np.repeat(np.arange(5), 8)
  embeddings = centres[identities] + 0.1 * rng.normal(size=(40, 16))
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  first = analysis.embed_2d(embeddings, method="tsne", seed=0, perplexity=5)
  np.testing.assert_array_equal(first, analysis.embed_2d(embeddings, method="tsne", seed=0,
                                                         perplexity=5))
  distance = np.linalg.norm(first[:, None] - first[None, :], axis=-1)
  np.fill_diagonal(distance, np.inf)
  assert np.all(identities[distance.argmin(axis=1)] == identities)
  modalities = np.tile([0, 1], 20)
  out = analysis.embedding_picture(embeddings, identities, modalities,
                                   str(tmp_path / "tsne.png"), max_identities=3, seed=2)
  assert len(np.unique(out["identities"])) == 3 and out["rows"].size == 24
  np.testing.assert_array_equal(identities[out["rows"]], out["identities"])


def test_tsne_without_scikit_learn_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)
  monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[analysis\]'"):
    analysis.embed_2d(np.eye(4), method="tsne")
  assert analysis.embed_2d(np.eye(4), method="pca").shape == (4, 2)  # PCA needs nothing


def separated_embeddings():
  """3 identities x 2 modalities x 3 images: same-identity pairs are near (intra ~0.003,
  cross ~0.1), different identities far (~1): bars of different groups never share a bin."""
  rng = np.random.default_rng(4)
  identities = np.repeat(np.arange(3), 6)
  modalities = np.tile(np.repeat([0, 1], 3), 3)
  embeddings = np.eye(8)[identities] + np.where(modalities[:, None] == 1, 0.45, 0.0) * np.eye(
      8)[7] + 0.03 * rng.normal(size=(18, 8))
  return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), identities, modalities


def test_distance_histograms_count_every_pair_and_colour_the_bars(tmp_path):
  embeddings, identities, modalities = separated_embeddings()
  bins = 40
  out = analysis.distance_histograms(embeddings, identities, modalities,
                                     str(tmp_path / "hist.png"), bins=bins, chunk_rows=5)
  groups = {group: [] for group in analysis.HISTOGRAM_GROUPS}
  for i in range(len(identities)):
    for j in range(i + 1, len(identities)):
      key = ("cross modality" if modalities[i] != modalities[j] else "same modality",
             "same identity" if identities[i] == identities[j] else "different identity")
      groups[key].append(1.0 - float(embeddings[i] @ embeddings[j]))
  assert sum(len(v) for v in groups.values()) == 18 * 17 // 2
  for number, group in enumerate(analysis.HISTOGRAM_GROUPS):
    expected, _ = np.histogram(groups[group], bins=bins, range=(0.0, 2.0))
    np.testing.assert_array_equal(out["counts"][number], expected)
    assert out["mean"][number] == pytest.approx(np.mean(groups[group]))
  picture = read(out["path"])
  for number, group in enumerate(analysis.HISTOGRAM_GROUPS):
    other = number ^ 1  # the other identity group of the same panel
    peak = out["density"][number].argmax()
    assert out["counts"][other][peak] == 0  # the test data keeps the bars apart
    column, row = out["peak_pixels"][number]
    blended = (1 - out["alpha"]) * WHITE + out["alpha"] * out["colours"][number]
    assert np.abs(picture[row, column] - blended).max() <= 3, group
  assert tuple(out["colours"][0]) != tuple(out["colours"][1])


def test_roc_picture_dots_in_curve_colours_better_model_higher(tmp_path):
  rng = np.random.default_rng(5)
  query_ids, gallery_ids = rng.integers(0, 10, 80), rng.integers(0, 10, 90)
  same = query_ids[:, None] == gallery_ids[None, :]
  noise = rng.normal(size=same.shape)
  curves, points = {}, {}
  for label, gap in (("good", 3.0), ("weak", 0.5)):
    distmat = noise - gap * same
    curves[label] = verification.roc_curve(distmat, query_ids, gallery_ids, num_points=50)
    points[label] = verification.tpr_at_fpr(distmat, query_ids, gallery_ids, fprs=(1e-2, 1e-1))
  out = analysis.roc_picture(curves, str(tmp_path / "roc.png"), points=points)
  picture = read(out["path"])
  assert tuple(out["colours"]["good"]) != tuple(out["colours"]["weak"])
  for label in curves:
    for column, row in out["point_pixels"][label]:
      assert np.abs(picture[row, column] - out["colours"][label]).max() <= 2, label
  # Same FPR target: the good model's TPR is higher, its dot higher up (smaller row).
  assert points["good"]["tpr"][1] > points["weak"]["tpr"][1]
  assert out["point_pixels"]["good"][1][1] < out["point_pixels"]["weak"][1][1]
