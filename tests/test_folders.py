"""stage=extract and the public Extractor (dakd_jax/evaluation/{folders,extractor}.py):
embeddings of image folders equal the model's embedding of each file computed directly, bad files
are reported by name, the ranking is the brute-force one; and one tiny end-to-end run (train,
evaluate with pictures and report, extract, Extractor.from_checkpoint)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import dakd_jax
from dakd_jax import augment
from dakd_jax import builders
from dakd_jax import config as config_lib
from dakd_jax import stage_parts
from dakd_jax import stages
from dakd_jax.evaluation import folders
from dakd_jax.evaluation.extractor import Extractor
from dakd_jax.models import resnet
from tests import tiny
from tests.test_cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 96, 48


def tiny_config(**overrides):
  values = {"data.image_height": H, "data.image_width": W, "model.depth": 10, "model.width": 4,
            "model.non_local": False, "eval.batch_size": 4, "log.progress": False,
            "eval.visual_top_k": 3, "eval.num_visual_queries": 2}
  values.update(overrides)
  return config_lib.load_config(os.path.join(REPO, "configs", "base.py"), values,
                                validate_config=False)


def write_images(folder, count, seed, size=(30, 60)):
  """`count` random RGB PNGs of `size` (w, h) named img_0.png, ...; returns their paths."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    path = os.path.join(folder, f"img_{i}.png")
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


def direct_embedding(model, variables, path, modality_code):
  """The model's embedding of one file: PIL decode + Lanczos resize, ImageNet normalisation."""
  image = np.asarray(Image.open(path).convert("RGB").resize((W, H), Image.LANCZOS))
  out = model.apply(variables, augment.normalize(jnp.asarray(image[None])),
                    jnp.array([modality_code], jnp.int32), train=False)
  return np.asarray(out["embedding"][0])


def test_read_folder_skips_and_names_bad_files(tmp_path):
  folder = str(tmp_path / "images")
  good = write_images(folder, 2, seed=0)
  with open(os.path.join(folder, "broken.jpg"), "wb") as f:
    f.write(b"definitely not a jpeg")
  whole = open(good[0], "rb").read()
  with open(os.path.join(folder, "truncated.png"), "wb") as f:
    f.write(whole[:len(whole) // 2])
  open(os.path.join(folder, ".hidden"), "w").close()
  os.makedirs(os.path.join(folder, "subdir"))
  images, names, bad = folders.read_folder(folder, H, W)
  assert names == ["img_0.png", "img_1.png"]
  assert [b["file"] for b in bad] == ["broken.jpg", "truncated.png"]
  assert all(b["file"] in b["error"] for b in bad)
  for image, path in zip(images, good):
    expected = np.asarray(Image.open(path).convert("RGB").resize((W, H), Image.LANCZOS))
    np.testing.assert_array_equal(image, expected)
  with pytest.raises(dakd_jax.DatasetError, match="no_such_folder"):
    folders.read_folder(str(tmp_path / "no_such_folder"), H, W)


def test_extract_round_trip_ranking_and_bad_file(tmp_path, capsys):
  query_paths = write_images(str(tmp_path / "q"), 3, seed=1)
  gallery_paths = write_images(str(tmp_path / "g"), 5, seed=2, size=(48, 96))
  with open(tmp_path / "g" / "zz_bad.jpg", "wb") as f:
    f.write(b"\xff\xd8 broken")
  model = builders.model_from_config(tiny_config())
  variables = resnet.init_variables(model, jax.random.key(3), (H, W))
  extractor = Extractor(model, variables, image_size=(H, W), batch_size=4, source="test weights")
  out_dir = str(tmp_path / "out")
  result = folders.extract_folders(
      extractor, out_dir, query_dir=str(tmp_path / "q"), query_modality="infrared",
      gallery_dir=str(tmp_path / "g"), gallery_modality="visible", top_k=3, num_pictured=2)
  query, gallery = np.load(f"{out_dir}/query.npy"), np.load(f"{out_dir}/gallery.npy")
  for row, path in zip(query, query_paths):
    np.testing.assert_allclose(row, direct_embedding(model, variables, path, 1), atol=1e-5)
  for row, path in zip(gallery, gallery_paths):
    np.testing.assert_allclose(row, direct_embedding(model, variables, path, 0), atol=1e-5)
  # The modality flag routes through its own stem: the other stem gives another embedding.
  assert np.abs(query[0] - direct_embedding(model, variables, query_paths[0], 0)).max() > 1e-3
  gallery_index = json.load(open(f"{out_dir}/gallery.json"))
  assert gallery_index["files"] == [f"img_{i}.png" for i in range(5)]
  assert [b["file"] for b in gallery_index["bad"]] == ["zz_bad.jpg"]
  assert gallery_index["modality"] == "visible" and gallery_index["checkpoint"] == "test weights"
  assert "zz_bad.jpg" in capsys.readouterr().err
  ranking = json.load(open(f"{out_dir}/ranking.json"))
  for q, entry in enumerate(ranking["queries"]):
    distances = 1 - gallery @ query[q]
    expected = np.argsort(distances, kind="stable")[:3]
    assert entry["query"] == f"img_{q}.png"
    assert [r["file"] for r in entry["ranked"]] == [f"img_{g}.png" for g in expected]
    np.testing.assert_allclose([r["distance"] for r in entry["ranked"]], distances[expected],
                               atol=1e-5)
  np.testing.assert_array_equal(result["order"][:, 0], np.argmin(1 - query @ gallery.T, 1))
  picture = Image.open(f"{out_dir}/ranked.png").convert("RGB")
  # 2 query rows (num_visual_queries) of 1 + 3 panels, grey frames (identities unknown).
  panel_w, panel_h = 2 * W + 8, 2 * H + 8
  assert picture.size == (16 + 4 * panel_w + 3 * 6 + 12, 16 + 18 + 2 * (panel_h + 14) + 6)
  assert picture.getpixel((8 + panel_w + 6 + 12 + 1, 8 + 18 + 1)) == (128, 128, 128)


def test_extract_config_checks(tmp_path):
  config = tiny_config(stage="extract", **{"extract.query_dir": str(tmp_path)})
  config_lib.validate(config)
  for field, value, message in (("extract.query_modality", "thermal", "choose one of"),
                                ("eval.visual_top_k", 0, "out of range"),
                                ("extract.query_dir", str(tmp_path / "missing"), "no such")):
    bad = tiny_config(**{field: value})
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(bad)
  with pytest.raises(config_lib.ConfigError, match="extract.query_dir"):
    config_lib.validate(tiny_config(stage="extract", **{"extract.query_dir": ""}))


def test_extractor_takes_arrays_of_any_size_and_paths(tmp_path):
  """The same picture as a file path, as an array at another size and as an array at the input
  size gives the same embedding (resized as the prepared data is); batches are padded."""
  paths = write_images(str(tmp_path / "imgs"), 5, seed=4)
  model = builders.model_from_config(tiny_config())
  variables = resnet.init_variables(model, jax.random.key(5), (H, W))
  extractor = Extractor(model, variables, image_size=(H, W), batch_size=4)
  from_paths = extractor(paths, "visible")
  raw = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # 60 x 30
  from_arrays = extractor(raw, "visible")
  assert from_paths.shape == (5, extractor.dim) and from_paths.dtype == np.float32
  np.testing.assert_allclose(from_arrays, from_paths, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1.0, atol=1e-5)
  for row, path in zip(from_paths, paths):
    np.testing.assert_allclose(row, direct_embedding(model, variables, path, 0), atol=1e-5)
  assert extractor([], "infrared").shape == (0, extractor.dim)
  with pytest.raises(ValueError, match="modality"):
    extractor(paths, "thermal")
  with pytest.raises(config_lib.ConfigError, match="weights file"):
    Extractor.from_checkpoint(paths[0])


@pytest.mark.slow
def test_run_writes_pictures_report_and_extracts(tmp_path):
  """One tiny run (teacher, student, eval with pictures), then stage=extract, in-process."""
  # The shared tiny run's programs (tests/tiny.py, from the compilation cache); 3 test persons,
  # so R5, R10 and R20 have nothing to rank.
  overrides = {**tiny.TINY, "data.root": str(tmp_path / "synthetic"),
               "data.prepared_dir": str(tmp_path / "tfds"), "synthetic.num_test_ids": 3,
               "synthetic.images_per_camera": 3, "eval.max_rank": 3,
               "eval.num_visual_queries": 3, "eval.visual_top_k": 4, "eval.analysis": True}
  args = tiny.arguments(overrides)
  workdir = str(tmp_path / "run")
  process = run_cli(args + [f"--workdir={workdir}"])
  assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
  results = json.load(open(f"{workdir}/eval/results.json"))["results"]
  report = open(f"{workdir}/report.md").read()
  mean = results["sysu_mm01/all/single-shot"]["mean"]
  line = next(l for l in report.splitlines() if l.startswith("sysu_mm01/all/single-shot"))
  numbers = [float(v) for v in re.findall(r"\d+\.\d+", line)]
  # eval.max_rank = 3 (3 test persons): R5, R10 and R20 are shown as "-".
  assert len(mean["cmc"]) == 3 and line.split()[2:5] == ["-", "-", "-"]
  np.testing.assert_allclose(numbers, [100 * mean["cmc"][0], 100 * mean["mAP"],
                                       100 * mean["mINP"]], atol=0.006)
  for name in ("cmc.png", "training_curves.png", "ranked_sysu_mm01_all_single-shot.png",
               "analysis_embedding_map.png", "analysis_distances.png", "analysis_roc.png",
               "analysis_activation.png"):
    assert f"(eval/{name})" in report and os.path.getsize(f"{workdir}/eval/{name}") > 1000
  # The default selection hands on the last step and every report says so.
  summary = json.load(open(f"{workdir}/eval/results.json"))
  assert summary["checkpoint_selection"] == "last step" and "Selected by: last step" in report
  assert summary["source"].endswith(f"student/checkpoints step {tiny.STUDENT_STEPS}")
  assert "[last step]" in process.stdout
  ranked = Image.open(f"{workdir}/eval/ranked_sysu_mm01_all_single-shot.png")
  panel_w, panel_h = 2 * W + 8, 2 * H + 8
  assert ranked.size == (16 + 5 * panel_w + 4 * 6 + 12, 16 + 18 + 3 * (panel_h + 14) + 2 * 6)
  # Extract: infrared test files of the synthetic set against its visible ones.
  root = tmp_path / "synthetic"
  test_ids = open(root / "exp" / "test_id.txt").read().split(",")
  person = next(p for p in (f"{int(i):04d}" for i in test_ids)
                if (root / "cam3" / p).is_dir() and (root / "cam1" / p).is_dir())
  config = config_lib.load_config("configs/demo.py", {
      **overrides, "stage": "extract", "extract.query_dir": str(root / "cam3" / person),
      "extract.gallery_dir": str(root / "cam1" / person)})
  result = stages.extract_stage(config, workdir, stage_parts.make_evaluation_parts(
      config, None, "extract", workdir=workdir))
  assert len(result["query_files"]) == 3 and len(result["gallery_files"]) == 3
  assert json.load(open(f"{workdir}/extract/query.json"))["checkpoint"].startswith(
      f"{workdir}/student/checkpoints step ")
  # Nothing of the training run is replaced by the extraction.
  assert json.load(open(f"{workdir}/config.json"))["stage"] == "all"
  assert json.load(open(f"{workdir}/extract/config.json"))["stage"] == "extract"
  # The public extractor, from the same checkpoint, gives the same embeddings.
  extractor = dakd_jax.Extractor.from_checkpoint(f"{workdir}/student")
  assert extractor.image_size == (H, W)
  assert extractor.source == json.load(open(f"{workdir}/extract/query.json"))["checkpoint"]
  files = [str(root / "cam3" / person / name) for name in result["query_files"]]
  np.testing.assert_allclose(extractor(files, "infrared"),
                             np.load(f"{workdir}/extract/query.npy"), atol=1e-5)
  # stage=export: the student as verified ONNX and StableHLO files, its results recorded.
  export_config = config_lib.load_config("configs/demo.py", {**overrides, "stage": "export"})
  stages.export_stage(export_config, workdir, stage_parts.make_evaluation_parts(
      export_config, None, "export", workdir=workdir))
  manifest = json.load(open(f"{workdir}/export/manifest.json"))
  assert manifest["checkpoint"] == extractor.source
  assert manifest["results"]["results"]["sysu_mm01/all/single-shot"] == mean
  assert manifest["verification"]["images"].endswith("given images")  # the test split's
  for name in ("extractor.onnx", "extractor.stablehlo"):
    assert os.path.getsize(f"{workdir}/export/{name}") > 1000
