"""Evaluation users can trust: which checkpoint is handed on and how reports say so, validation
identities held out of training, guards (RegDB trial, dataset fingerprint), seed bands, query
expansion and TPR wired into the evaluator."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax import builders
from dakd_jax import checkpoint
from dakd_jax import stage_checkpoints
from dakd_jax import cli
from dakd_jax import config as config_lib
from dakd_jax.data import prepare
from dakd_jax.data import specs
from dakd_jax.data import synthetic
from dakd_jax.data import tfds_builders
from dakd_jax.data.records import Protocol
from dakd_jax.errors import CheckpointError
from dakd_jax.evaluation import evaluator as evaluator_lib
from dakd_jax.evaluation import metrics
from dakd_jax.evaluation import query_expansion
from dakd_jax.evaluation import report
from dakd_jax.evaluation import verification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_steps(directory, selection, maps):
  manager = checkpoint.CheckpointManager(directory, keep_last=10, use_async=False)
  for step, value in maps.items():
    metrics_ = None if value is None or selection == "last" else {"mAP": value}
    manager.save(step, {"w": jnp.full((2,), step, jnp.float32)},
                 {"selection": selection, "stage": "teacher"}, metrics=metrics_)
  manager.close()


@pytest.mark.parametrize("selection, expected", [("last", 3), ("val", 2),
                                                 ("test_oracle", 2)])
def test_the_handed_on_step_follows_the_selection_rule(tmp_path, selection, expected):
  _save_steps(str(tmp_path / "checkpoints"), selection, {1: 0.3, 2: 0.9, 3: 0.5})
  directory, step = stage_checkpoints.find_stage_checkpoint(str(tmp_path), hint="")
  assert (directory, step) == (str(tmp_path / "checkpoints"), expected)


def test_reports_name_the_selection_and_scoring():
  summary = {"source": "/w/student/checkpoints step 8",
             "checkpoint_selection": stage_checkpoints.SELECTION_LABELS["test_oracle"],
             "protocol": {"dataset": "regdb", "rerank": True, "flip": False,
                          "query_expansion": "average, k=5, alpha=3.0"}}
  title = report.table_title(summary)
  assert "[oracle (test-set selection)]" in title
  assert "re-ranking on | flip off | query expansion average, k=5, alpha=3.0" in title
  assert max(len(line) for line in title.splitlines()) <= 80
  defaults = config_lib.load_config(os.path.join(REPO, "configs", "sysu.py"),
                                    validate_config=False)
  released = config_lib.load_config(os.path.join(REPO, "configs", "sysu.py:released_code"),
                                    validate_config=False)
  assert (defaults.checkpoint.select, released.checkpoint.select) == ("last", "test_oracle")


def test_trial_mismatch_is_refused_unless_allowed(capsys):
  config = config_lib.load_config(os.path.join(REPO, "configs", "regdb.py:trial=5"),
                                  validate_config=False)
  stored = config.to_dict()
  stored["data"]["trial"] = 3
  with pytest.raises(CheckpointError) as error:
    builders.check_architecture(stored, config, "w/teacher step 10")
  message = str(error.value)
  assert "trained on RegDB trial 3" in message and "--config.data.trial=3" in message
  assert "eval.allow_trial_mismatch=True" in message and "\n" not in message
  allowed = config_lib.load_config(os.path.join(REPO, "configs", "regdb.py:trial=5"),
                                   {"eval.allow_trial_mismatch": True}, validate_config=False)
  builders.check_architecture(stored, allowed, "w/teacher step 10")
  assert "warning" in capsys.readouterr().out
  sysu = config_lib.load_config(os.path.join(REPO, "configs", "sysu.py"), validate_config=False)
  other = sysu.to_dict()
  other["data"]["trial"] = 7  # SYSU-MM01 has no training trials: the field means nothing
  builders.check_architecture(other, sysu, "w/teacher step 10")


def test_another_input_size_than_trained_is_run_with_a_warning_naming_both(capsys):
  config = config_lib.load_config(os.path.join(REPO, "configs", "sysu.py"),
                                  {"data.image_height": 256}, validate_config=False)
  stored = config.to_dict()
  builders.check_architecture(stored, config, "w/teacher step 10")
  assert capsys.readouterr().out == ""  # same size: nothing to say
  stored["data"]["image_height"] = 384
  builders.check_architecture(stored, config, "w/teacher step 10")
  printed = capsys.readouterr().out
  assert printed.startswith("dakd_jax: warning: w/teacher step 10 was trained on 384x128 images;")
  assert "feeds it 256x128" in printed and "--config.data.image_height=384" in printed


@pytest.fixture(scope="module")
def sysu_tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sysu") / "tree")
  synthetic.ensure_synthetic(root, "sysu", num_train_ids=5, num_val_ids=2, num_test_ids=3,
                             images_per_camera=2, height=32, width=16, seed=4)
  return root


def test_fingerprint_changes_with_a_split_file_and_an_image(sysu_tree, tmp_path):
  import shutil
  root = str(tmp_path / "copy")
  shutil.copytree(sysu_tree, root)
  spec = specs.get_spec("sysu_mm01")
  read = lambda: tfds_builders.read_split_records("sysu_mm01", root, None)
  first = tfds_builders.fingerprint(read(), root, spec.split_files(root, None))
  assert tfds_builders.fingerprint(read(), root, spec.split_files(root, None)) == first
  test_ids = os.path.join(root, "exp", "test_id.txt")
  with open(test_ids, "a") as f:
    f.write("\n")  # the same identities, another file
  second = tfds_builders.fingerprint(read(), root, spec.split_files(root, None))
  assert second != first
  records = read()
  os.truncate(records["test"][0].path, 100)
  assert tfds_builders.fingerprint(read(), root, spec.split_files(root, None)) != second


def test_validation_identities_are_held_out_of_training(sysu_tree, tmp_path):
  spec = specs.get_spec("sysu_mm01")
  records = tfds_builders.read_split_records("sysu_mm01", sysu_tree, None)
  held, note = prepare.hold_out_validation(spec, sysu_tree, None, records, 0.1, 0)
  val_ids = [int(t) for t in open(os.path.join(sysu_tree, "exp", "val_id.txt")).read()
             .split(",")]
  assert sorted({r.identity for r in held["val"]}) == sorted(val_ids)
  assert not {r.identity for r in held["train"]} & set(val_ids)
  assert len(held["train"]) + len(held["val"]) == len(records["train"])
  assert "2 identities held out" in note and "SYSU-MM01 ships" in note
  # Elsewhere a seeded share of the training identities: same seed, same split.
  regdb = str(tmp_path / "regdb")
  synthetic.ensure_synthetic(regdb, "regdb", num_ids=20, images_per_modality=2, height=32,
                             width=16, seed=1)
  regdb_records = tfds_builders.read_split_records("regdb", regdb, 1)
  first, _ = prepare.hold_out_validation(specs.get_spec("regdb"), regdb, 1, regdb_records,
                                         0.2, 3)
  again, _ = prepare.hold_out_validation(specs.get_spec("regdb"), regdb, 1, regdb_records,
                                         0.2, 3)
  ids = lambda split: sorted({r.identity for r in split["val"]})
  assert ids(first) == ids(again) and len(ids(first)) == 2  # 20% of 10 training identities
  assert set(ids(first)) <= {r.identity for r in regdb_records["train"]}
  assert not set(ids(first)) & {r.identity for r in first["train"]}
  # Labels stay usable: the training split relabels to 0..C'-1 when prepared.
  data = prepare.prepare_data("sysu_mm01", sysu_tree, str(tmp_path / "tfds"), (32, 16),
                              progress=False, validation=(0.1, 0))
  assert sorted(set(data.val_meta["identity"].tolist())) == sorted(val_ids)
  assert data.num_classes == 5 and data.held_out == note
  settings = evaluator_lib.EvalSettings(batch_size=4, max_rank=20, show_progress=False)
  model = builders.model_from_config(config_lib.load_config(
      os.path.join(REPO, "configs", "demo.py"), {"model.width": 4}, validate_config=False))
  validation = evaluator_lib.Evaluator.on_validation(model, data, settings, None)
  (protocol, (query, gallery)), = validation.rows.items()
  assert protocol.setting == "sysu_mm01/infrared_to_visible/validation"
  assert (data.val_meta["modality"][query] == 1).all()
  assert (data.val_meta["modality"][gallery] == 0).all()
  assert len(query) + len(gallery) == len(data.val_meta["label"])
  assert validation.settings.max_rank == 2  # two validation identities fill two ranks


def test_evaluator_scores_with_query_expansion_and_tpr_as_the_functions_do():
  rng = np.random.default_rng(0)
  n = 40
  identity = np.repeat(np.arange(10), 4)
  modality = np.tile([1, 1, 0, 0], 10)
  camera = np.where(modality == 1, 3, rng.choice([1, 2], n))
  meta = {"identity": identity, "camera": camera, "modality": modality,
          "label": np.full(n, -1), "path": np.array([f"{i}" for i in range(n)])}
  data = prepare.DataBundle(spec=specs.get_spec("sysu_mm01"), root="/x", trial=None,
                            train_source=None, test_source=None, train_meta={},
                            test_meta=meta, num_classes=0, test_rows={})
  protocol = Protocol("sysu_mm01", 0, mode="all", shots=1)
  query, gallery = np.flatnonzero(modality == 1), np.flatnonzero(modality == 0)
  settings = evaluator_lib.EvalSettings(max_rank=5, query_expansion=True, aqe_k=3,
                                        aqe_alpha=2.0, tpr_fprs=(0.01, 0.1))
  evaluator = evaluator_lib.Evaluator(None, data, [protocol], settings, None,
                                      rows={protocol: (query, gallery)})
  embeddings = rng.normal(size=(n, 8)) + 2 * np.eye(10, 8)[identity]
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  results = evaluator.score(embeddings.astype(np.float32))["sysu_mm01/all/single-shot"]
  removed = metrics.removed_pairs("sysu", identity[query], camera[query], identity[gallery],
                                  camera[gallery])
  q, g = query_expansion.average_query_expansion(embeddings[query], embeddings[gallery], k=3,
                                                  alpha=2.0, removed=removed)
  distances = -(q @ g.T)
  expected = metrics.rank_metrics(distances, identity[query], identity[gallery], camera[query],
                                  camera[gallery], protocol="sysu", max_rank=5)
  trial = results["trials"][0]
  assert trial["mAP"] == pytest.approx(expected["mAP"])
  np.testing.assert_allclose(trial["cmc"], expected["cmc"])
  tpr = verification.tpr_at_fpr(distances, identity[query], identity[gallery],
                                fprs=(0.01, 0.1), removed=removed)["summary"]
  assert trial["tpr_at_fpr"] == pytest.approx(tpr)
  assert results["mean"]["tpr_at_fpr"] == pytest.approx(tpr)
  plain = evaluator_lib.Evaluator(None, data, [protocol], evaluator_lib.EvalSettings(
      max_rank=5), None, rows={protocol: (query, gallery)}).score(embeddings)
  assert plain["sysu_mm01/all/single-shot"]["mean"]["mAP"] != pytest.approx(trial["mAP"])


def test_seed_band_by_hand_and_the_runner(tmp_path, monkeypatch):
  def results(r1, mean_ap):
    return {"s/a": {"mean": {"cmc": [r1], "mAP": mean_ap, "mINP": 0.1}}}
  band = report.seed_band({0: results(0.2, 0.3), 1: results(0.4, 0.3), 2: results(0.9, 0.6)})
  entry = band["s/a"]
  assert entry["mean"]["R1"] == pytest.approx(0.5)
  assert entry["std"]["R1"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
  assert entry["std"]["mINP"] == pytest.approx(0) and entry["seeds"][2]["mAP"] == 0.6
  text = report.format_seed_band(band)
  assert "50.00 +- 36.06" in text and max(len(line) for line in text.splitlines()) <= 80
  # The runner: one run per seed, each in its own folder, then the band.
  calls = []

  def fake_start(config, workdir):
    calls.append((config.seed, tuple(config.seeds), workdir))
    value = 0.1 * (config.seed + 1)
    return {"eval": {"results": results(value, value), "checkpoint_selection": "last step"}}

  monkeypatch.setattr(cli, "start", fake_start)
  config = config_lib.load_config(os.path.join(REPO, "configs", "demo.py"),
                                  {"seeds": (3, 5)}, validate_config=False)
  out = cli.run_seed_band(config, str(tmp_path))
  assert calls == [(3, (), str(tmp_path / "seed_3")), (5, (), str(tmp_path / "seed_5"))]
  assert out["seeds"]["s/a"]["mean"]["R1"] == pytest.approx(0.5)
  stored = json.load(open(tmp_path / "seeds.json"))
  assert stored["seeds"] == [3, 5] and stored["checkpoint_selection"] == "last step"
  assert "mean+-sd" in open(tmp_path / "seeds.md").read()


@pytest.mark.parametrize("overrides, message", [
    ({"seeds": (0, -1)}, "config.seeds"),
    ({"seeds": (0, 1), "stage": "extract", "extract.query_dir": REPO}, "has no seed band"),
    ({"eval.tpr_fprs": (0.0,)}, "config.eval.tpr_fprs"),
    ({"checkpoint.select": "best"}, "config.checkpoint.select"),
    ({"data.val_fraction": 1.0}, "config.data.val_fraction"),
])
def test_new_fields_are_validated(overrides, message):
  config = config_lib.load_config(os.path.join(REPO, "configs", "demo.py"), overrides,
                                  validate_config=False)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, num_devices=1)
