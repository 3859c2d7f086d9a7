"""RegDB's trials in one command (config.data.trials, cli.run_trial_band): one folder per trial,
then every setting per trial with mean +- std, labelled with the selection rule."""
import json
import os

import numpy as np
import pytest

from dakd_jax import cli
from dakd_jax import config as config_lib
from dakd_jax import errors
from dakd_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGDB = os.path.join(REPO, "configs", "regdb.py")


def test_trials_all_lists_the_ten_trials_and_bad_lists_are_refused():
  config = config_lib.load_config(REGDB + ":trials=all,released_code", [])
  assert tuple(config.data.trials) == tuple(range(1, 11))
  assert tuple(config_lib.load_config(REGDB + ":trial=4", []).data.trials) == ()
  for overrides, needle in (
      (["data.trials=(1,1)"], "distinct RegDB trials 1..10"),
      (["data.trials=(0,2)"], "distinct RegDB trials 1..10"),
      (["data.trials=(1,2)", "seeds=(0,1)"], "run one band at a time"),
      (["data.trials=(1,2)", "stage=export"], "has no trial band")):
    with pytest.raises(errors.ConfigError, match=needle):
      config_lib.load_config(REGDB, overrides)
  with pytest.raises(errors.ConfigError, match="only RegDB trains per trial"):
    config_lib.load_config(os.path.join(REPO, "configs", "sysu.py"), ["data.trials=(1,2)"])


def test_the_runner_gives_each_trial_its_folder_and_the_band_by_hand(tmp_path, monkeypatch):
  calls = []

  def fake_start(config, workdir):
    calls.append((config.data.trial, tuple(config.data.trials), workdir))
    value = {1: 0.2, 2: 0.4, 3: 0.9}[config.data.trial]
    results = {direction: {"mean": {"cmc": [value], "mAP": value / 2, "mINP": 0.1}}
               for direction in ("regdb/visible_to_thermal", "regdb/thermal_to_visible")}
    return {"eval": {"results": results, "checkpoint_selection": "last step"}}

  monkeypatch.setattr(cli, "start", fake_start)
  config = config_lib.load_config(REGDB, ["data.trials=(1,2,3)"])
  out = cli.run_trial_band(config, str(tmp_path))
  assert calls == [(t, (), str(tmp_path / f"trial_{t}")) for t in (1, 2, 3)]
  stored = json.load(open(tmp_path / "trials.json"))
  assert stored["trials"] == [1, 2, 3] and stored["checkpoint_selection"] == "last step"
  for direction in ("regdb/visible_to_thermal", "regdb/thermal_to_visible"):
    entry = stored["settings"][direction]
    assert entry["mean"]["R1"] == pytest.approx(0.5)
    assert entry["std"]["R1"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert entry["mean"]["mAP"] == pytest.approx(0.25)
    assert entry["trials"]["3"] == {"R1": 0.9, "mAP": 0.45, "mINP": 0.1}
    assert out["trials"][direction]["mean"] == entry["mean"]
  text = open(tmp_path / "trials.md").read()
  assert text.startswith("Checkpoint selection: last step\n")
  assert "trial band over 3 trials" in text and "50.00 +- 36.06" in text


@pytest.mark.slow
def test_two_regdb_trials_end_to_end_in_one_command(tmp_path, capsys):
  """A tiny synthetic RegDB tree, trials 1 and 2, stage=all: each trial trains on its own split
  in its folder, and the band's mean is the mean of the trials' own results.json."""
  root = str(tmp_path / "RegDB")
  synthetic.ensure_synthetic(root, "regdb", num_ids=12, images_per_modality=4, height=96,
                             width=48, num_trials=2)
  overrides = {
      "data.root": root, "data.prepared_dir": str(tmp_path / "tfds"), "data.trials": "(1,2)",
      "data.image_height": 96, "data.image_width": 48, "model.depth": 10, "model.width": 4,
      "model.non_local": False,
      "data.ids_per_batch": 2, "data.images_per_id": 2, "data.num_workers": 0,
      "eval.batch_size": 32, "eval.max_rank": 3, "eval.pictures": False,
      "log.progress": False, "teacher.epochs": 1, "teacher.steps_per_epoch": 2,
      "teacher.eval_every_epochs": 100, "distill.epochs": 1, "distill.steps_per_epoch": 2,
      "distill.eval_every_epochs": 100, "teacher.decay_epochs": "(1,2)",
      "teacher.warmup_epochs": 0}
  args = ["--config=" + REGDB] + [f"--config.{k}={v}" for k, v in overrides.items()]
  assert cli.main_from_args(args, str(tmp_path / "run")) == 0, capsys.readouterr().err
  band = json.load(open(tmp_path / "run" / "trials.json"))
  assert band["trials"] == [1, 2]
  per_trial = [json.load(open(tmp_path / "run" / f"trial_{t}" / "eval" / "results.json"))
               for t in (1, 2)]
  # One prepared copy of the images, shared by both trials (each holds only its split lists).
  assert len(os.listdir(tmp_path / "tfds" / "regdb")) == 1
  assert set(band["settings"]) == set(per_trial[0]["results"])
  assert len(band["settings"]) == 2  # Both directions.
  for setting, entry in band["settings"].items():
    r1 = [trial["results"][setting]["mean"]["cmc"][0] for trial in per_trial]
    assert entry["mean"]["R1"] == pytest.approx(np.mean(r1))
    assert entry["std"]["R1"] == pytest.approx(np.std(r1, ddof=1))
