"""Pictures, plots and reports (dakd_jax/evaluation/{pictures,plots,report}.py): ranking, frame
colours read back from the PNG, CMC and training-curve plots, tables and report contents against
the results they were written from."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dakd_jax.evaluation import metrics
from dakd_jax.evaluation import pictures
from dakd_jax.evaluation import plots
from dakd_jax.evaluation import report

H, W, SCALE = 24, 12, 2
GREEN, RED, BLUE = (0, 170, 0), (220, 0, 0), (40, 90, 220)


def brute_force_rank(query, gallery, query_ids, gallery_ids, query_cams, gallery_cams, top_k,
                     rule):
  """Per query: sort the kept gallery positions by (1 - cosine, position)."""
  def removed(q, g):
    if rule == "sysu":
      return query_cams[q] == 3 and gallery_cams[g] == 2
    if rule == "llcm":
      return query_ids[q] == gallery_ids[g] and query_cams[q] == gallery_cams[g]
    return False

  orders, dists = [], []
  for q in range(len(query)):
    kept = [(1.0 - float(np.dot(query[q], gallery[g])), g) for g in range(len(gallery))
            if not removed(q, g)]
    kept.sort()
    kept = kept[:top_k] + [(np.inf, -1)] * (top_k - len(kept[:top_k]))
    orders.append([g for _, g in kept])
    dists.append([d for d, _ in kept])
  return np.array(orders), np.array(dists)


@pytest.mark.parametrize("rule", ["sysu", "regdb", "llcm"])
def test_rank_equals_brute_force_with_camera_filter(rule):
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  query, gallery = unit(rng.normal(size=(7, 5))), unit(rng.normal(size=(9, 5)))
  query_ids, gallery_ids = np.array([1, 2, 1, 3, 2, 1, 3]), np.array([1, 1, 2, 2, 3, 1, 2, 3, 1])
  query_cams = np.array([3, 6, 3, 6, 3, 3, 6])
  gallery_cams = np.array([1, 2, 4, 5, 2, 2, 1, 2, 5]) if rule != "llcm" else np.array(
      [3, 6, 3, 1, 6, 2, 6, 6, 3])
  removed = metrics.removed_pairs(rule, query_ids, query_cams, gallery_ids, gallery_cams)
  for top_k in (3, 9, 12):  # 12 > gallery: padded (more so with the filter).
    order, dist = pictures.rank(query, gallery, top_k=top_k, removed=removed)
    expected_order, expected_dist = brute_force_rank(query, gallery, query_ids, gallery_ids,
                                                     query_cams, gallery_cams, top_k, rule)
    np.testing.assert_array_equal(order, expected_order)
    np.testing.assert_allclose(dist, expected_dist, rtol=1e-5, atol=1e-6)
  if rule == "sysu":  # camera-3 queries never list camera-2 images.
    assert not np.isin(order[query_cams == 3], np.flatnonzero(gallery_cams == 2)).any()
  if rule == "regdb":
    assert not removed.any()
  if rule == "llcm":  # hand-checked: query 0 (id 1, camera 3) loses gallery 0 and 8.
    assert removed[0].tolist() == [True] + [False] * 7 + [True]


def _fake_split():
  """6 test images: 2 infrared queries (ids 1, 2), 4 visible gallery images; each image a
  distinct solid colour. Embeddings put query id 1 nearest to gallery rows 3 (id 2), 2 (id 1),
  5 (id 1), 4 (id 3), in that order."""
  colours = [(10, 10, 10), (60, 60, 60), (200, 180, 0), (0, 200, 200), (200, 0, 200),
             (120, 60, 0)]
  source = [{"image": np.full((H, W, 3), c, np.uint8)} for c in colours]
  meta = {"identity": np.array([1, 2, 1, 2, 3, 1]), "camera": np.array([3, 6, 1, 2, 4, 5])}
  angles = {0: 0.0, 1: 2.0, 2: 0.2, 3: 0.1, 4: 0.6, 5: 0.4}
  embeddings = np.array([[np.cos(angles[i]), np.sin(angles[i])] for i in range(6)])
  return source, meta, embeddings


def _pixel(picture, x, y):
  return tuple(int(v) for v in picture[y, x, :3])


def test_ranked_picture_panels_frames_and_images(tmp_path):
  source, meta, embeddings = _fake_split()
  path = str(tmp_path / "ranked.png")
  top_k = 5  # Gallery has 4 images: the 5th panel is empty.
  out = pictures.ranked_picture(source, meta, embeddings, np.array([0, 1]),
                                np.array([2, 3, 4, 5]), path, rule="regdb", top_k=top_k,
                                queries=[0, 1], title="test")
  # Query 0 (id 1, angle 0): gallery by angle 3 (0.1, id 2), 2 (0.2, id 1), 5 (0.4, id 1),
  # 4 (0.6, id 3).
  np.testing.assert_array_equal(out["gallery"][0], [3, 2, 5, 4, -1])
  np.testing.assert_array_equal(out["matches"][0], [False, True, True, False, False])
  picture = np.asarray(Image.open(path).convert("RGB"))
  panel_w, panel_h = W * SCALE + 2 * pictures.BORDER, H * SCALE + 2 * pictures.BORDER
  # Size: margins, title, 2 rows of panel + caption + gap; 1 + top_k panels and the query gap.
  expected_width = 2 * pictures.MARGIN + (top_k + 1) * panel_w + top_k * pictures.GAP + pictures.QUERY_GAP
  expected_height = (2 * pictures.MARGIN + pictures.TITLE + 2 * (panel_h + pictures.CAPTION) + pictures.GAP)
  assert picture.shape[:2] == (expected_height, expected_width)
  expected_colours = {0: BLUE, 1: RED, 2: GREEN, 3: GREEN, 4: RED}
  for column, colour in expected_colours.items():
    left = pictures.MARGIN + column * (panel_w + pictures.GAP) + (pictures.QUERY_GAP if column else 0)
    top = pictures.MARGIN + pictures.TITLE
    for x, y in ((left + 1, top + 1), (left + panel_w - 2, top + panel_h // 2),
                 (left + panel_w // 2, top + panel_h - 2)):
      assert _pixel(picture, x, y) == colour, (column, x, y)
    # Inside the frame: the ranked image itself (solid colour of its source row).
    row = 0 if column == 0 else out["gallery"][0][column - 1]
    inner = picture[top + pictures.BORDER:top + panel_h - pictures.BORDER,
                    left + pictures.BORDER:left + panel_w - pictures.BORDER]
    assert (inner == source[row]["image"][0, 0]).all()
  # The padded 5th panel has no frame: white.
  left = pictures.MARGIN + 5 * (panel_w + pictures.GAP) + pictures.QUERY_GAP
  assert _pixel(picture, left + 1, pictures.MARGIN + pictures.TITLE + 1) == (255, 255, 255)
  # Second row: query id 2 (angle 2.0): nearest gallery is row 4 (0.6, id 3) -> red first.
  assert out["gallery"][1][0] == 4 and not out["matches"][1][0]
  top = pictures.MARGIN + pictures.TITLE + panel_h + pictures.CAPTION + pictures.GAP
  assert _pixel(picture, pictures.MARGIN + panel_w + pictures.GAP + pictures.QUERY_GAP + 1, top + 1) == RED
  assert _pixel(picture, pictures.MARGIN + 1, top + 1) == BLUE


def test_random_queries_are_distinct_and_seeded():
  a, b = pictures.pick_queries(50, 8, seed=3), pictures.pick_queries(50, 8, seed=3)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 8 and a.max() < 50
  np.testing.assert_array_equal(pictures.pick_queries(3, 8, seed=0), [0, 1, 2])


def _results(cmc_trials):
  out = {}
  for name, trials in cmc_trials.items():
    trials = np.array(trials, float)
    out[name] = {"trials": [{"trial": i, "cmc": t.tolist(), "mAP": 0.1 * (i + 1),
                             "mINP": 0.05 * (i + 1)} for i, t in enumerate(trials)],
                 "mean": {"cmc": trials.mean(0).tolist(),
                          "mAP": float(np.mean([0.1 * (i + 1) for i in range(len(trials))])),
                          "mINP": float(np.mean([0.05 * (i + 1) for i in range(len(trials))]))}}
  return out


def test_cmc_plot_file_and_size(tmp_path):
  ramp = np.minimum(1, np.arange(1, 21) / 10)
  results = _results({"sysu_mm01/all/single-shot": [ramp * 0.9, ramp],
                      "sysu_mm01/indoor/single-shot": [ramp ** 2, ramp ** 3]})
  path = plots.cmc_plot(results, str(tmp_path / "cmc.png"))
  picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
  assert picture.shape == (400 + 22, 600, 3)  # Two settings: one legend row below the axes.
  # Curves are drawn in colour (grey axes and text alone would have r == g == b).
  assert (np.abs(picture[..., 0] - picture[..., 2]) > 80).sum() > 200


def test_training_curves_plot(tmp_path):
  records = [{"step": s, "stage": "teacher", "wall_time": 0.0, "loss": 5.0 / s, "kl": 0.1}
             for s in range(1, 6)] + [{"step": 5, "stage": "teacher", "wall_time": 0.0,
                                       "eval_rank1": 0.3, "eval_mAP": 0.2}]
  path = plots.training_curves_plot({"teacher": records, "student": records[:2]},
                                  str(tmp_path / "curves.png"))
  assert Image.open(path).size == (1100, 700)  # Two stages: two rows.
  assert plots.training_curves_plot({"teacher": []}, str(tmp_path / "none.png")) is None
  assert not os.path.exists(tmp_path / "none.png")


def test_report_table_equals_results(tmp_path):
  results = _results({"regdb/visible_to_thermal": [np.linspace(0.4213, 1, 20)],
                      "regdb/thermal_to_visible": [np.linspace(0.3377, 0.99, 20)]})
  summary = {"source": "/x/student/checkpoints step 8", "results": results,
             "protocol": {"dataset": "regdb", "trial": 3}}
  picture = tmp_path / "eval" / "cmc.png"
  picture.parent.mkdir()
  picture.write_bytes(b"")
  config = {"data": {"dataset": "regdb", "image_height": 288}, "model": {"depth": 50}}
  text = open(report.write_report(str(tmp_path), config, summary, {"CMC": str(picture)})).read()
  for section in ("## Config", "## Checkpoint", "## Protocol", "## Metrics", "## Pictures"):
    assert section in text
  assert "/x/student/checkpoints step 8" in text and "- trial: 3" in text
  assert "| `data.image_height` | `288` |" in text and "| `model.depth` | `50` |" in text
  assert "![CMC](eval/cmc.png)" in text
  for name, setting in results.items():
    line = next(l for l in text.splitlines() if l.startswith(name))
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", line[len(name):])]
    cmc = setting["mean"]["cmc"]
    expected = [100 * cmc[r - 1] for r in (1, 5, 10, 20)] + [100 * setting["mean"]["mAP"],
                                                             100 * setting["mean"]["mINP"]]
    np.testing.assert_allclose(numbers, expected, atol=0.006)
  assert report.format_table(results) in text


def test_table_fits_80_columns_and_puts_long_settings_on_their_own_line():
  results = _results({"sysu_mm01/all/single-shot": [np.linspace(0.5, 1, 20)],
                      "llcm/visible_to_infrared/deen_test_script": [np.linspace(0.25, 1, 20)]})
  lines = report.format_table(results, title="t").splitlines()
  assert max(len(line) for line in lines) <= 80
  long_name = lines.index("llcm/visible_to_infrared/deen_test_script")
  numbers = [float(v) for v in lines[long_name + 1].split()]
  assert numbers[0] == pytest.approx(25.0) and numbers[-1] == 1
  assert lines[3].startswith("sysu_mm01/all/single-shot") and "50.00" in lines[3]


def test_cmc_legend_sits_outside_the_curves():
  """Eight settings (SYSU's four, twice): the legend's box and the axes' box do not meet."""
  ramp = np.minimum(1, np.arange(1, 21) / 10)
  results = _results({f"sysu_mm01/{mode}/{shot}-shot ({copy})": [ramp, ramp ** 2]
                      for mode in ("all", "indoor") for shot in ("single", "multi")
                      for copy in ("a", "b")})
  figure, axis, legend = plots.cmc_figure(results)
  figure.canvas.draw()
  legend_box, axis_box = legend.get_window_extent(), axis.get_window_extent()
  figure_box = figure.bbox
  assert len(legend.get_texts()) == 8
  assert legend_box.y1 < axis_box.y0  # Entirely below the axes...
  assert legend_box.y0 >= figure_box.y0 and legend_box.x0 >= 0  # ... and inside the picture.
  assert legend_box.x1 <= figure_box.x1


def test_plots_leave_a_notebooks_matplotlib_backend_and_pyplot_alone(tmp_path):
  """A notebook's backend (here svg) is still its own after a run draws its plots, and pyplot
  (its open figures, its current figure) is never imported."""
  probe = (
      "import sys, matplotlib\n"
      "matplotlib.use('svg')\n"
      "from dakd_jax.evaluation import plots\n"
      "trials = [{'cmc': [0.5, 1.0]}]\n"
      f"plots.cmc_plot({{'a': {{'mean': {{'cmc': [0.5, 1.0]}}, 'trials': trials}}}}, "
      f"{str(tmp_path / 'cmc.png')!r})\n"
      "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n")
  done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                        check=True, timeout=120, cwd=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))))
  assert done.stdout.split() == ["svg", "False"]
  with Image.open(tmp_path / "cmc.png") as picture:
    assert picture.size == (600, 422)  # 400 + 22 for one legend row


def test_ranked_pictures_fit_a_screen_split_into_files(tmp_path):
  """384x128 images, top-10, 8 queries: at most MAX_WIDTH wide, 4 rows a file, two files."""
  count = 30
  source = [{"image": np.full((384, 128, 3), 8 * i, np.uint8)} for i in range(count)]
  meta = {"identity": np.arange(count) % 5, "camera": np.where(np.arange(count) < 8, 3, 1)}
  embeddings = np.random.default_rng(0).normal(size=(count, 4))
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  out = pictures.ranked_picture(source, meta, embeddings, np.arange(8), np.arange(8, count),
                                str(tmp_path / "ranked_x.png"), rule="regdb", top_k=10,
                                num_queries=8)
  assert out["paths"] == [str(tmp_path / "ranked_x.png"), str(tmp_path / "ranked_x_part2.png")]
  # Width 8 + 11 panels + 10 gaps + 12 + 8 <= 1600: image width (1600 - 140) / 11 = 132.7 px.
  scale = pictures.fit_scale((384, 128), 10)
  assert scale == pytest.approx((1600 - (16 + 11 * 8 + 10 * 6 + 12)) / (11 * 128))
  for path in out["paths"]:
    width, height = Image.open(path).size
    panel_h = round(384 * scale) + 2 * pictures.BORDER
    assert width <= pictures.MAX_WIDTH
    assert height == 2 * pictures.MARGIN + pictures.TITLE + 4 * (
        panel_h + pictures.CAPTION) + 3 * pictures.GAP
  assert pictures.fit_scale((96, 48), 10) == 2  # Small images keep twice their size.
