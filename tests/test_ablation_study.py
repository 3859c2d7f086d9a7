"""benchmarks/ablation_study.py at a tiny size (the suite's tiny run: 8 teacher and 2 student
steps, one preset, two seeds, two of the four ablations): it runs, and its table says what its
runs did. The four ablations' losses are tested in tests/test_distill.py; here two (the ends of
the paired row) show that the study runs each one it is given.

The study is run as a user would (a subprocess); the test then reads every run's own files
(config.json, last_evaluation.json, metrics.jsonl) and checks the table against means and
sample standard deviations it computes itself, and that the four students of a seed differ in
nothing but `distill.ablation`.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = ("only_kd", "full_mlkd")  # the paired row's two ends
PRESETS = ("default",)  # The script's other preset runs the same code with other settings.
SEEDS = (0, 1)
# The shared tiny run (tests/tiny.py): its pretrain, teacher and evaluation programs come from
# the compilation cache; only the two ablations' student steps are compiled here. 8 teacher
# steps (the tiny run's epoch), 2 per student.
TEACHER_STEPS, STUDENT_STEPS = tiny.TINY["teacher.steps_per_epoch"], 2
TINY = {**tiny.TINY, **tiny.PRETRAIN, "synthetic.images_per_camera": 4,
        "teacher.epochs": 1, "distill.epochs": 1, "distill.steps_per_epoch": STUDENT_STEPS}


def read_json(path):
  with open(path) as f:
    return json.load(f)


def table_row(markdown, preset, network):
  """(runs, steps, [R1, mAP, mINP] cells) of a row of the study's table; a cell is (mean, std),
  std None where the row has one run."""
  for line in markdown.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if cells[:2] == [preset, network]:
      parsed = []
      for cell in cells[4:7]:
        mean, _, std = re.fullmatch(r"(-?[\d.]+)( \+- ([\d.]+))?", cell).groups()
        parsed.append((float(mean), None if std is None else float(std)))
      return int(cells[2]), int(cells[3]), parsed
  raise AssertionError(f"no row {preset} | {network} in\n{markdown}")


def scores_of(stage_dir):
  last = read_json(os.path.join(stage_dir, "last_evaluation.json"))
  mean = last["results"]["sysu_mm01/all/single-shot"]["mean"]
  return np.array([mean["cmc"][0], mean["mAP"], mean["mINP"]]) * 100


@pytest.mark.slow
def test_study_runs_the_ablations_it_is_given_and_tabulates_its_runs(tmp_path):
  out = tmp_path / "study"
  overrides = {**TINY, "data.root": str(tmp_path / "synthetic"),
               "pretrain.data_root": str(tmp_path / "synthetic_pretrain"),
               "data.prepared_dir": str(tmp_path / "tfds")}
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "ablation_study.py"), f"--out={out}",
       "--seeds=" + ",".join(str(s) for s in SEEDS), "--presets=" + ",".join(PRESETS),
       "--ablations=" + ",".join(ABLATIONS),
       *["--set=" + argument.removeprefix("--config.")
         for argument in tiny.arguments(overrides)]],
      cwd=REPO, capture_output=True, text=True, timeout=1800,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  markdown = (out / "ablation.md").read_text()
  assert markdown in result.stdout
  assert (out / "cmc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  for preset in PRESETS:
    teacher_dir = out / preset / f"teacher_seed{SEEDS[0]}"
    teacher_config = read_json(teacher_dir / "config.json")
    assert teacher_config["stage"] == "teacher" and teacher_config["seed"] == SEEDS[0]
    # Every run of the preset starts from the preset's one pretrain file.
    backbone = str(out / preset / "pretrain" / "backbone.npz")
    assert teacher_config["model"]["init_weights"] == backbone
    assert (teacher_config["model"]["modality_specific_stem"] is (preset == "default"))
    per_network = {"teacher": [scores_of(teacher_dir / "teacher")]}
    for seed in SEEDS:
      student_configs = []
      for ablation in ABLATIONS:
        run = out / preset / f"seed{seed}" / ablation
        config = read_json(run / "config.json")
        assert config["distill"]["ablation"] == ablation and config["seed"] == seed
        assert config["distill"]["teacher_checkpoint"] == str(teacher_dir / "teacher")
        assert config["model"]["init_weights"] == backbone
        steps = [r["step"] for r in map(json.loads, (run / "student" / "metrics.jsonl")
                                        .read_text().splitlines()) if "loss" in r]
        assert steps == list(range(1, STUDENT_STEPS + 1))
        student_configs.append(config)
        per_network.setdefault(f"student `{ablation}`", []).append(
            scores_of(run / "student"))
      # No per-ablation tuning: the students of a seed differ in distill.ablation only.
      for config in student_configs:
        config["distill"].pop("ablation")
      assert all(c == student_configs[0] for c in student_configs)
    for network, runs in per_network.items():
      runs = np.array(runs)
      count, steps, cells = table_row(markdown, preset, network)
      assert count == len(runs) and steps == (
          TEACHER_STEPS if network == "teacher" else STUDENT_STEPS)
      for column, (mean, std) in enumerate(cells):
        assert mean == pytest.approx(runs[:, column].mean(), abs=0.006)
        if len(runs) > 1:
          assert std == pytest.approx(runs[:, column].std(ddof=1), abs=0.006)
        else:
          assert std is None
    # The paired row: full_mlkd - only_kd seed by seed, and how often full_mlkd was ahead.
    differences = (np.array(per_network["student `full_mlkd`"])
                   - np.array(per_network["student `only_kd`"]))
    paired = [line for line in markdown.split("full_mlkd - only_kd")[1].splitlines()
              if line.startswith(f"| {preset} |")][0]
    cells = [c.strip() for c in paired.strip("|").split("|")][1:]
    for cell, want_mean in zip(cells[:3], differences.mean(0)):
      assert float(cell.split(" +- ")[0]) == pytest.approx(want_mean, abs=0.006)
    assert cells[3] == f"{int((differences[:, 0] > 0).sum())} of {len(SEEDS)} seeds"


def test_an_unknown_ablation_is_refused_before_any_run(tmp_path):
  from tests.benchmark_scripts import load_benchmark  # pylint: disable=import-outside-toplevel
  study = load_benchmark("ablation_study")
  with pytest.raises(SystemExit, match="--ablations='only_kd,kd': each must be one of only_kd"):
    study.main([f"--out={tmp_path}", "--ablations=only_kd,kd"])
  assert sorted(os.listdir(tmp_path)) == []
