"""benchmarks/full_size.py at a tiny size: every phase measured in its table, the memory plans
printed, the sampled phases projected by image count, the table written after every phase, and
the projected run time worked out from the measured rates."""
import os
import re

import numpy as np

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_tiny_rehearsal_writes_its_table_and_projection(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("DAKD_PROGRESS_EVERY_S", "1e-6")  # Every phase's progress lines show.
  rehearsal = load_benchmark("full_size")
  overrides = ["model.depth=10", "model.width=8", "model.non_local=False", "data.image_height=96",
               "data.image_width=48",
               "data.ids_per_batch=2", "data.images_per_id=2", "eval.batch_size=32",
               "eval.num_trials=2", "eval.max_rank=2", "eval.shots=('single',)",
               "teacher.steps_per_epoch=5",
               "distill.steps_per_epoch=4", "teacher.epochs=3", "distill.epochs=2",
               "teacher.eval_every_epochs=1", "teacher.eval_start_epoch=0",
               "teacher.decay_epochs=(1,2)", "teacher.warmup_epochs=0"]
  text = rehearsal.main(["--scale", "0.04", "--images-per-camera", "2", "--steps", "1",
                         "--sample", "10",
                         "--data-root", str(tmp_path / "data"), "--workdir",
                         str(tmp_path / "work")] + [f"--override={o}" for o in overrides])
  assert (tmp_path / "work" / "full_size.md").read_text() == text + "\n"
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == len(rehearsal.COLUMNS) and cells[0] not in ("phase", "---"):
      rows[cells[0]] = dict(zip(rehearsal.COLUMNS, cells))
  assert list(rows) == ["generate", "prepare", "teacher memory plan + compile", "teacher steps",
                        "student memory plan + compile", "student steps",
                        "teacher memory rebuild", "evaluation: extraction",
                        "evaluation: scoring", "export"]
  # Sampled: 10 images embedded, the time scaled to the split's count, which the note names.
  train_images = int(rows["teacher memory rebuild"]["notes"].split()[0])
  assert train_images > 10
  assert rows["teacher memory rebuild"]["notes"].endswith("projected from 10 images")
  assert rows["evaluation: extraction"]["notes"].endswith("projected from 10 images")
  assert "sampled features: no accuracy" in text
  assert float(rows["generate"]["disk GiB"]) > 0 and float(rows["prepare"]["disk GiB"]) > 0
  assert rows["teacher memory plan + compile"]["notes"].startswith("teacher step: ")
  assert rows["export"]["notes"] == "skipped: needs --checkpoint"
  # The projection from the table's own numbers: 3 teacher epochs of 5 steps, each with a
  # rebuild, 2 student epochs of 4 steps, 3 + 2 training-time evaluations, the student's
  # centres (a rebuild) and the final evaluation.
  step = {name: float(re.match(r"([\d.e+-]+) s/step wall", rows[f"{name} steps"]["notes"])[1])
          for name in ("teacher", "student")}
  rebuild = float(rows["teacher memory rebuild"]["wall s"])
  evaluation = (float(rows["evaluation: extraction"]["wall s"])
                + float(rows["evaluation: scoring"]["wall s"]))
  expected = (3 * (5 * step["teacher"] + rebuild) + 2 * 4 * step["student"] + rebuild
              + (3 + 2 + 1) * evaluation)
  seconds = float(re.search(r"steps\): [\d.]+ h wall \(([\d.]+) s\)", text)[1])
  assert seconds == pytest.approx(expected, rel=0.01, abs=1)  # The table has 3 digits.
  err = capsys.readouterr().err
  assert "dakd_jax: generating synthetic sysu persons: " in err
  assert "dakd_jax: memory: visible: " in err


def test_the_table_is_written_after_every_phase_and_a_sample_is_spread(tmp_path):
  rehearsal = load_benchmark("full_size")
  path = tmp_path / "table.md"
  phases = rehearsal.Phases()
  phases.on_row = lambda: rehearsal.write_text(str(path), phases.table())
  phases.run("first", lambda: None)
  assert "| first |" in path.read_text() and "second" not in path.read_text()
  phases.run("second", lambda: None)
  phases.rows[-1]["wall s"], phases.rows[-1]["CPU s"] = 2.0, 1.0
  phases.scale_last(3.0, "projected from 5 images")
  assert "| second | 6 | 3 |" in path.read_text()
  assert path.read_text().rstrip().endswith("projected from 5 images |")
  np.testing.assert_array_equal(rehearsal.spread(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(rehearsal.spread(3, 0), [0, 1, 2])
  np.testing.assert_array_equal(rehearsal.spread(3, 5), [0, 1, 2])
