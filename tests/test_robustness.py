"""Corrupted evaluation (eval.corruption, eval.severity): folders, cells and summaries worked by
hand, and stage=eval run as a user runs it: the same numbers on 1 and 2 devices, a label in
every output, the plain eval/results.json untouched."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dakd_jax import builders
from dakd_jax import config as config_lib
from dakd_jax import stage_parts
from dakd_jax.errors import ConfigError
from dakd_jax.evaluation import corruptions
from dakd_jax.evaluation import robustness
from dakd_jax.models import weights
from tests import tiny
from tests import xla_flags
from tests.test_cli import run_cli
from tests.test_train import REPO
from tests.test_train import finish
from tests.test_train import run_py
from tests.test_train import tiny_overrides

SETTING = "sysu_mm01/all/single-shot"


def test_output_folders_and_cells_by_hand():
  assert robustness.output_folder("fog", "3") == "corrupted-fog-s3"
  assert robustness.output_folder("mixed", "all") == "corrupted-mixed-sall"
  assert robustness.output_folder("fog", "all") == "robustness"
  assert robustness.output_folder("all", "2") == "robustness"
  assert robustness.cells("fog", "3") == [("fog", "3")]
  assert robustness.cells("mixed", "all") == [("mixed", "all")]
  assert robustness.cells("rain", "all") == [("rain", str(s)) for s in range(1, 6)]
  every = robustness.cells("all", "all")
  assert len(every) == 20 * 5 + 1 and every[-1] == ("mixed", "all")
  assert every[:5] == [("gaussian_noise", str(s)) for s in range(1, 6)]
  assert robustness.cells("all", "4")[-1] == ("mixed", "4") and len(robustness.cells("all", "4")) == 21
  assert "fog, severity 3" in robustness.label("fog", "3")
  assert "severities 1-5 in turn" in robustness.label("all", "all")
  assert "drawn per image (1-5)" in robustness.label("mixed", "all")


def results_of(rank1, mean_ap, mean_inp):
  return {SETTING: {"mean": {"cmc": [rank1, 1.0], "mAP": mean_ap, "mINP": mean_inp},
                    "trials": []}}


def test_summary_means_by_hand():
  evaluated = [{"corruption": "fog", "severity": "1", "results": results_of(0.5, 0.4, 0.3)},
               {"corruption": "fog", "severity": "2", "results": results_of(0.3, 0.2, 0.1)},
               {"corruption": "gaussian_noise", "severity": "1",
                "results": results_of(0.1, 0.1, 0.1)},
               {"corruption": "mixed", "severity": "all", "results": results_of(0.2, 0.25, 0.05)}]
  entry = robustness.summarize(results_of(0.9, 0.8, 0.7), evaluated)[SETTING]
  assert entry["clean"] == {"R1": 0.9, "mAP": 0.8, "mINP": 0.7}
  assert entry["mixed"] == {"R1": 0.2, "mAP": 0.25, "mINP": 0.05}
  assert entry["corruption_mean"]["fog"] == pytest.approx({"R1": 0.4, "mAP": 0.3, "mINP": 0.2})
  assert entry["group_mean"]["weather"] == pytest.approx({"R1": 0.4, "mAP": 0.3, "mINP": 0.2})
  assert entry["group_mean"]["noise"] == pytest.approx({"R1": 0.1, "mAP": 0.1, "mINP": 0.1})
  assert set(entry["group_mean"]) == {"weather", "noise"}
  # Over the three named cells, not over the two corruptions' means.
  assert entry["mean"] == pytest.approx({"R1": 0.3, "mAP": 0.7 / 3, "mINP": 0.5 / 3})
  table = robustness.format_summary(SETTING, entry)
  fog_row = next(line for line in table.splitlines() if line.startswith("fog"))
  assert fog_row.split() == ["fog", "50.00", "30.00", "40.00", "30.00", "20.00"]
  assert "mixed (benchmark figure)" in table and "90.00" in table
  assert all(len(line) <= 80 for line in table.splitlines())
  markdown = robustness.format_markdown({SETTING: entry})
  assert "| fog | 2 | 30.00 | 20.00 | 10.00 |" in markdown


def test_config_refuses_saved_features_a_swept_seed_band_and_unknown_values(tmp_path):
  features = tmp_path / "features.npz"
  features.write_bytes(b"")
  with pytest.raises(ConfigError, match="unset --config.eval.features"):
    config_lib.load_config("configs/demo.py", {"eval.corruption": "fog",
                                               "eval.features": str(features)})
  with pytest.raises(ConfigError, match="seed band needs one figure"):
    config_lib.load_config("configs/demo.py", {"eval.corruption": "all", "seeds": (0, 1)})
  config_lib.load_config("configs/demo.py", {"eval.corruption": "mixed", "seeds": (0, 1)})
  with pytest.raises(ConfigError, match="at least 61x32 pixels.*is 60x48"):
    config_lib.load_config("configs/demo.py", {"eval.corruption": "rain",
                                               "data.image_height": 60})
  with pytest.raises(ConfigError, match="eval.severity"):
    config_lib.load_config("configs/demo.py", {"eval.severity": "6"})
  with pytest.raises(ConfigError, match="eval.corruption"):
    config_lib.load_config("configs/demo.py", {"eval.corruption": "smog"})


def untrained_weights(path):
  config = config_lib.load_config("configs/demo.py", tiny.NETWORK, validate_config=False)
  model = builders.model_from_config(config)
  weights.save_variables(builders.init_model_variables(config, model,
                                                       stage_parts.teacher_keys(config)[0]), path)
  return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """One synthetic dataset, its prepared copy and untrained weights for the stage runs."""
  root = tmp_path_factory.mktemp("robustness")
  return str(root), untrained_weights(str(root / "untrained.npz"))


def read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
def test_stage_eval_corrupted_is_the_same_on_1_and_2_devices_and_labelled(tmp_path, shared):
  data_dir, checkpoint = shared
  args = tiny_overrides(data_dir, **{"stage": "eval", "eval.checkpoint": checkpoint,
                                          "eval.corruption": "mixed", "eval.severity": "all",
                                          "eval.pictures": False, "eval.batch_size": 8})
  outputs, results = {}, {}
  for devices in (1, 2):
    workdir = str(tmp_path / f"devices_{devices}")
    env = {"XLA_FLAGS": xla_flags.with_device_count(devices),
           "JAX_PLATFORMS": "cpu"}
    outputs[devices] = finish(run_py(args, workdir, env_extra=env))
    # The weights file's name leads the tag: another checkpoint than the workdir's student.
    folder = os.path.join(workdir, "eval", "untrained-corrupted-mixed-sall")
    results[devices] = read_json(os.path.join(folder, "results.json"))
    assert not os.path.exists(os.path.join(workdir, "eval", "results.json"))
    assert "one of the 20 corruptions drawn per image" in outputs[devices]
    with open(os.path.join(folder, "report.md")) as f:
      assert "one of the 20 corruptions drawn per image" in f.read()
  assert results[2]["provenance"]["devices"]["count"] == 2
  assert results[1]["provenance"]["devices"]["count"] == 1
  for devices in (1, 2):
    stored = results[devices]
    assert stored["corruption"]["corruption"] == "mixed"
    assert stored["corruption"]["severity"] == "all"
    assert stored["provenance"]["libraries"]["imagecorruptions-imaug"]
  one, two = results[1]["results"][SETTING], results[2]["results"][SETTING]
  np.testing.assert_allclose(one["mean"]["cmc"], two["mean"]["cmc"], atol=1e-6)
  assert one["mean"]["mAP"] == pytest.approx(two["mean"]["mAP"], abs=1e-6)
  # The corruption changed the numbers (the comparison is of corrupted evaluations).
  clean = results[1]["clean_results"][SETTING]["mean"]
  assert (clean["mAP"], clean["mINP"]) != (one["mean"]["mAP"], one["mean"]["mINP"])


@pytest.mark.slow
def test_stage_eval_sweep_writes_the_robustness_table_and_pictures(tmp_path, shared):
  data_dir, checkpoint = shared
  args = tiny_overrides(data_dir, **{"stage": "eval", "eval.checkpoint": checkpoint,
                                          "eval.corruption": "rain", "eval.severity": "all"})
  workdir = str(tmp_path / "run")
  result = run_cli(args + [f"--workdir={workdir}"])  # in this process: the sweep is the subject
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout
  folder = os.path.join(workdir, "eval", "untrained-robustness")
  stored = read_json(os.path.join(folder, "results.json"))
  assert stored["complete"] is True
  assert [(e["corruption"], e["severity"]) for e in stored["evaluations"]] == [
      ("rain", str(s)) for s in range(1, 6)]
  entry = stored["robustness"][SETTING]
  rank1 = [entry["cells"]["rain"][str(s)]["R1"] for s in range(1, 6)]
  assert entry["corruption_mean"]["rain"]["R1"] == pytest.approx(np.mean(rank1))
  assert entry["group_mean"]["weather"]["R1"] == pytest.approx(np.mean(rank1))
  rain_row = next(line for line in output.splitlines() if line.startswith("rain "))
  assert [float(v) for v in rain_row.split()[1:6]] == pytest.approx(
      [round(100 * r, 2) for r in rank1])
  for name in ("robustness.md", "report.md"):
    with open(os.path.join(folder, name)) as f:
      text = f.read()
    assert "rain, severities 1-5 in turn" in text and "| rain | 5 |" in text
  for picture in ("corruption_sheet.png", "severity.png"):
    assert os.path.getsize(os.path.join(folder, picture)) > 10_000
  assert not os.path.exists(os.path.join(workdir, "eval", "results.json"))
  assert stored["corruption"]["library"].startswith(corruptions.LIBRARY)


def test_without_the_extra_the_command_stops_at_start_up_in_one_line(tmp_path):
  child = textwrap.dedent("""
      import runpy, sys
      sys.modules["imagecorruptions"] = None  # as if the robustness extra were not installed
      sys.argv = ["run.py", "--config=configs/demo.py", "--config.eval.corruption=fog",
                  "--print_config"]
      runpy.run_path("run.py", run_name="__main__")
  """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300, check=False)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].endswith(corruptions.MISSING_EXTRA_MESSAGE), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
