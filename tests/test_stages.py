"""stage=all's closing table (`stages.summarize_stages`): every stage's network on one protocol.

The printed differences are checked against numbers worked by hand; a tiny whole run checks the
table's rows against independent evaluations of the same networks (stage=eval in the test's
process, on saved random and pretrained weights) and against each stage's own log.
"""
import json
import os

import numpy as np
import pytest

from dakd_jax import builders
from dakd_jax import config as config_lib
from dakd_jax import stage_parts
from dakd_jax import stages
from dakd_jax.models import weights
from dakd_jax.train import loop
from tests import tiny
from tests.test_cli import run_cli
from tests.test_train import finish
from tests.test_train import read_jsonl
from tests.test_train import run_py
from tests.test_train import tiny_overrides

SETTING = "sysu_mm01/all/single-shot"


def setting_results(rank1, mean_ap, mean_inp, trials=2):
  trial = {"cmc": [rank1, 1.0], "mAP": mean_ap, "mINP": mean_inp}
  return {SETTING: {"mean": dict(trial), "trials": [dict(trial)] * trials}}


def test_format_stages_gives_each_stage_and_its_gain_by_hand():
  summary = {"setting": SETTING, "rows": [
      {"name": "untrained (random init)", "results": setting_results(0.05, 0.11, 0.07)},
      {"name": "initial weights (pretrain)", "results": setting_results(0.20, 0.27, 0.21)},
      {"name": "teacher (step 120)", "results": setting_results(0.325, 0.355, 0.26)},
      {"name": "student (full_mlkd) (step 60)", "results": setting_results(0.30, 0.36, 0.25)}]}
  text = stages.format_stages(summary)
  lines = text.splitlines()
  assert lines[0] == f"every stage on {SETTING}, 2 trials"
  assert max(len(line) for line in lines) <= 80
  # A 2-rank CMC: R1 then no R5/R10/R20; percent; the trial count.
  assert lines[4].split() == ["untrained", "(random", "init)", "5.00", "-", "-", "-", "11.00",
                              "7.00", "2"]
  # teacher - its initial weights: 32.5 - 20 = +12.5 R1, 35.5 - 27 = +8.5 mAP, 26 - 21 = +5.
  assert "teacher - initial weights (pretrain): R1 +12.50, mAP +8.50, mINP +5.00" in lines
  # student - teacher: 30 - 32.5 = -2.5, 36 - 35.5 = +0.5, 25 - 26 = -1.
  assert "student - teacher: R1 -2.50, mAP +0.50, mINP -1.00" in lines
  # Without initial weights the teacher is compared with the untrained network it started as.
  del summary["rows"][1]
  assert "teacher - untrained (random init): R1 +27.50" in stages.format_stages(summary)


def all_single_shot(path):
  with open(path) as f:
    return json.load(f)["results"][SETTING]


@pytest.mark.slow
def test_stage_all_ends_with_every_stage_on_one_protocol(tmp_path):
  args = tiny_overrides(str(tmp_path), **tiny.PRETRAIN, **{"eval.pictures": False})
  workdir = str(tmp_path / "run")
  output = finish(run_py(args, workdir))
  with open(os.path.join(workdir, stages.STAGES_SUMMARY)) as f:
    summary = json.load(f)
  assert summary["setting"] == SETTING
  names = [row["name"] for row in summary["rows"]]
  assert names == ["untrained (random init)", "initial weights (pretrain)",
                   f"teacher (step {tiny.TEACHER_STEPS})",
                   f"student (full_mlkd) (step {tiny.STUDENT_STEPS})"]
  rows = {name.split(" (")[0]: row["results"][SETTING] for name, row in zip(names,
                                                                           summary["rows"])}
  assert all(len(r["trials"]) == 2 for r in rows.values())
  assert f"every stage on {SETTING}" in output and "student - teacher: R1" in output

  # Teacher and student rows: each stage's last evaluation, as logged during training.
  for stage in ("teacher", "student"):
    logged = [r for r in read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
              if "eval_rank1" in r][-1]
    assert rows[stage]["mean"]["cmc"][0] == pytest.approx(logged["eval_rank1"])
    assert rows[stage]["mean"]["mAP"] == pytest.approx(logged["eval_mAP"])
    assert loop.read_last_evaluation(os.path.join(workdir, stage))["step"] == logged["step"]

  # Untrained and initial-weights rows: the same networks evaluated again by stage=eval, here in
  # the test's process (the teacher's random initialisation, saved; the pretrain stage's file).
  config = config_lib.load_config("configs/demo.py", tiny.NETWORK, validate_config=False)
  untrained_file = str(tmp_path / "untrained.npz")
  model = builders.model_from_config(config)
  assert config.model.init_weights == "" and config.seed == 0
  weights.save_variables(builders.init_model_variables(config, model,
                                                       stage_parts.teacher_keys(config)[0]),
                         untrained_file)
  for name, path in (("untrained", untrained_file),
                     ("initial weights", os.path.join(workdir, "pretrain", "backbone.npz"))):
    eval_dir = str(tmp_path / f"eval_{name.replace(' ', '_')}")
    evaluated = run_cli(args + ["--config.stage=eval", "--config.eval.checkpoint=" + path,
                                f"--workdir={eval_dir}"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # Not the workdir's student: the evaluation is in eval/<the file's name>.
    tag = os.path.splitext(os.path.basename(path))[0]
    independent = all_single_shot(os.path.join(eval_dir, "eval", tag, "results.json"))
    np.testing.assert_allclose(rows[name]["mean"]["cmc"], independent["mean"]["cmc"],
                               atol=1e-6)
    assert rows[name]["mean"]["mAP"] == pytest.approx(independent["mean"]["mAP"], abs=1e-6)
  # The two are different networks (the comparison above is not vacuous).
  assert rows["untrained"]["mean"]["mAP"] != rows["initial weights"]["mean"]["mAP"]
