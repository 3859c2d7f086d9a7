"""Full-size rehearsal: the users' main command's phases at SYSU-MM01's real size, measured.

  python benchmarks/full_size.py                         # SYSU-MM01 size: 395+96 persons,
                                                         # ~44,000 images, ResNet-50, 384x128
  python benchmarks/full_size.py --scale 0.05 --images-per-camera 4 --steps 2   # a CPU sample
  python benchmarks/full_size.py --checkpoint workdirs/sysu/student             # + export
  python benchmarks/full_size.py --sample 2000 --steps 1     # real size, sampled embeddings

Phases, in order, each in its own row of the table: generate a synthetic tree with SYSU-MM01's
layout and counts (cached at --data-root; progress lines in a log), prepare it (TFDS
ArrayRecord at the training size), the memory plan of the teacher and the student steps at the
configured batch (XLA's analysis against the device's memory, dakd_jax/train/memory_plan.py),
a few real steps of each (skipped, saying why, when a step does not fit), one teacher memory
rebuild (every training image embedded), the full evaluation protocol (all modes and shots,
eval.num_trials trials) of --checkpoint or of the initial weights, and the export of
--checkpoint. Per phase: wall time, CPU time of this process and its children, the peak
resident memory so far and the disk it wrote. Last, the projected wall time of a full run
(teacher.epochs + distill.epochs) from the measured step, rebuild and evaluation rates. Writes
the table to <workdir>/full_size.md after every phase (a stopped rehearsal keeps the rows it
measured). Runs unchanged on a GPU.

--sample N: the memory rebuild and the evaluation's feature extraction embed N images each
(spread evenly over what they would embed) and their wall and CPU times are projected to the
full count by image count (the rows say so); the evaluation's scoring (every setting and trial)
runs in full on the partly filled features, so its metrics mean nothing and are not printed.
On 2 CPU cores a ResNet-50 embeds about 5 images of 384x128 per second: the full rebuild of
SYSU-MM01's ~35,000 training images (x1.5, the channel view) would take about 3 hours there.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():  # Grain reads absl flags.
  flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import train_step  # noqa: E402  benchmarks/train_step.py: the step runners
from dakd_jax import builders  # noqa: E402
from dakd_jax import config as config_lib  # noqa: E402
from dakd_jax import errors  # noqa: E402
from dakd_jax import sharding as sharding_lib  # noqa: E402
from dakd_jax import stage_parts  # noqa: E402
from dakd_jax import stages  # noqa: E402
from dakd_jax.data import prepare  # noqa: E402
from dakd_jax.data import specs  # noqa: E402
from dakd_jax.data import tfds_builders  # noqa: E402
from dakd_jax.train import centres as centres_lib  # noqa: E402
from dakd_jax.train import memory_plan  # noqa: E402

GIB = 1024 ** 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SYSU-MM01's identities (train, val, test) and about its images per camera folder.
SYSU_IDS = (296, 99, 96)
COLUMNS = ("phase", "wall s", "CPU s", "peak RSS GiB", "disk GiB", "notes")


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_gib() -> float:
  """The largest resident memory of this process or a child so far (Linux: ru_maxrss in KiB)."""
  return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
             resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024 / GIB


def disk_bytes(path: str) -> int:
  """Bytes of the files under `path` (0 when missing)."""
  total = 0
  for folder, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(folder, name)) for name in files
                 if os.path.isfile(os.path.join(folder, name)))
  return total


class Phases:
  """The table's rows: `run(name, fn, disk=path)` measures one phase and returns fn().
  `on_row()` is called after every row (the script writes its file there)."""

  def __init__(self, on_row=lambda: None):
    self.rows = []
    self.on_row = on_row

  def run(self, name: str, fn, *, disk: str | None = None, notes: str = ""):
    print(f"full_size: {name} ...", flush=True)
    before = disk_bytes(disk) if disk else 0
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    row = {"phase": name, "wall s": time.perf_counter() - wall, "CPU s": cpu_seconds() - cpu,
           "peak RSS GiB": peak_rss_gib(),
           "disk GiB": (disk_bytes(disk) - before) / GIB if disk else None, "notes": notes}
    self.rows.append(row)
    self.on_row()
    return result

  def scale_last(self, factor: float, note: str) -> None:
    """Projects the last row's wall and CPU time by `factor` (a sampled phase), saying so."""
    row = self.rows[-1]
    row["wall s"], row["CPU s"] = row["wall s"] * factor, row["CPU s"] * factor
    row["notes"] = f"{row['notes']}; {note}" if row["notes"] else note
    self.on_row()

  def skip(self, name: str, why: str) -> None:
    self.rows.append({"phase": name, "wall s": None, "CPU s": None, "peak RSS GiB": None,
                      "disk GiB": None, "notes": why})
    self.on_row()

  def table(self) -> str:
    def cell(value):
      return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in self.rows]
    return "\n".join(lines)


def rehearsal_config(args) -> "ml_collections.ConfigDict":
  """The config file with the synthetic tree at --data-root, SYSU-MM01's counts x --scale, and
  the --override fields."""
  train, val, test = (max(2, round(n * args.scale)) for n in SYSU_IDS)
  overrides = [f"data.root={args.data_root}", f"data.prepared_dir={args.data_root}_tfds",
               "synthetic.enabled=True", f"synthetic.num_train_ids={train}",
               f"synthetic.num_val_ids={val}", f"synthetic.num_test_ids={test}",
               f"synthetic.images_per_camera={args.images_per_camera}",
               "synthetic.image_height=288", "synthetic.image_width=144", "data.num_workers=0",
               *args.override]
  return config_lib.load_config(args.config, overrides)


def plan_and_time(phases: Phases, config, model, variables, mesh, steps: int) -> dict:
  """The memory plan of both steps, then `steps` timed steps of each that fits; returns
  {'teacher': seconds per step or None, 'student': ...}."""
  rng = np.random.default_rng(0)
  batches = [train_step.random_batch(config, rng) for _ in range(steps + 1)]
  batch = memory_plan.abstract_batch(config, sharding_lib.data_sharding(mesh))
  per_step = {}
  for name, make in (("teacher", train_step.make_teacher_runner),
                     ("student", train_step.make_student_runner)):
    jitted, extra, state = make(config, model, variables, mesh, rng)
    try:
      line = phases.run(f"{name} memory plan + compile", lambda: memory_plan.check_step_memory(
          jitted, (state, *extra, batch), name, config))
      phases.rows[-1]["notes"] = line
      phases.on_row()
    except errors.InsufficientMemoryError as error:
      phases.rows[-1:] = []
      phases.skip(f"{name} memory plan + compile", str(error))
      phases.skip(f"{name} steps", "skipped: the step does not fit")
      per_step[name] = None
      continue
    if steps < 1:
      per_step[name] = None
      continue
    _, wall, cpu, _ = phases.run(f"{name} steps", lambda: train_step.time_steps(
        jitted, extra, state, batches, mesh))
    phases.rows[-1]["notes"] = f"{wall:.3g} s/step wall, {cpu:.3g} s/step CPU ({steps} steps)"
    phases.on_row()
    per_step[name] = wall
  return per_step


def projected_seconds(config, steps_per_epoch: dict, per_step: dict, rebuild_s: float,
                      eval_s: float) -> float | None:
  """Wall seconds of the full run: per teacher epoch its steps and a memory rebuild, per student
  epoch its steps, one evaluation per training-time evaluation (the full protocol's time: an
  upper bound, those evaluate a subset), the student's teacher centres (a rebuild) and the
  final evaluation. None when a step was not timed."""
  if per_step.get("teacher") is None or per_step.get("student") is None:
    return None
  teacher_evals = sum(1 for e in range(1, config.teacher.epochs + 1)
                      if (e > config.teacher.eval_start_epoch
                          and e % config.teacher.eval_every_epochs == 0)
                      or e == config.teacher.epochs)
  student_evals = sum(1 for e in range(1, config.distill.epochs + 1)
                      if e % config.distill.eval_every_epochs == 0 or e == config.distill.epochs)
  seconds = (config.teacher.epochs * (steps_per_epoch["teacher"] * per_step["teacher"]
                                      + rebuild_s)
             + config.distill.epochs * steps_per_epoch["student"] * per_step["student"]
             + rebuild_s + (teacher_evals + student_evals + 1) * eval_s)
  return seconds


def spread(count: int, sample: int) -> np.ndarray:
  """`sample` positions spread evenly over range(count) (all of them when sample is 0 or not
  smaller)."""
  if not sample or sample >= count:
    return np.arange(count)
  return np.unique(np.linspace(0, count - 1, sample).round().astype(np.int64))


def sampled_training_data(data, sample: int):
  """`data` whose training split is `sample` of its images (all when 0), spread evenly."""
  rows = spread(len(data.train_meta["label"]), sample)
  if len(rows) == len(data.train_meta["label"]):
    return data
  meta = {name: np.asarray(values)[rows] for name, values in data.train_meta.items()}
  return dataclasses.replace(data, train_meta=meta,
                             train_source=tfds_builders.SplitView(data.train_source, rows, meta))


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as file:
    file.write(text + "\n")


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "sysu.py"))
  parser.add_argument("--override", action="append", default=[],
                      help="a config field, e.g. --override model.depth=18 (repeatable)")
  parser.add_argument("--data-root", default="data/synthetic_sysu_full")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="fraction of SYSU-MM01's identity counts (1 = 395 + 96)")
  parser.add_argument("--images-per-camera", type=int, default=20)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per stage (0: none)")
  parser.add_argument("--checkpoint", default="", help="evaluated and exported; default: the "
                      "initial weights are evaluated and the export is skipped")
  parser.add_argument("--workdir", default="workdirs/full_size")
  parser.add_argument("--sample", type=int, default=0,
                      help="images embedded by the rebuild and the evaluation, their times "
                      "projected to the full count (0: all)")
  args = parser.parse_args(argv)
  config = rehearsal_config(args)
  table_path = os.path.join(args.workdir, "full_size.md")
  phases = Phases()
  phases.on_row = lambda: write_text(table_path, "Full-size rehearsal, phases so far (running)"
                                     "\n\n" + phases.table())
  phases.run("generate", lambda: prepare.ensure_synthetic_data(
      specs.get_spec(config.data.dataset), os.path.abspath(config.data.root),
      builders.synthetic_sizes(config), show_progress=True), disk=config.data.root)
  data = phases.run("prepare", lambda: builders.prepare_data(config),
                    disk=config.data.prepared_dir)
  mesh = sharding_lib.make_mesh()
  model = builders.model_from_config(config)
  variables = builders.init_model_variables(config, model, jax.random.key(0))
  per_step = plan_and_time(phases, config, model, variables, mesh, args.steps)
  total_train = len(data.train_meta["label"])
  rebuild_data = sampled_training_data(data, args.sample)
  phases.run("teacher memory rebuild", lambda: centres_lib.build_teacher_memories(
      model, variables, rebuild_data, mesh, jax.random.key(1),
      batch_size=config.eval.batch_size),
             notes=f"{total_train} training images, x1.5 (channel view)")
  if rebuild_data is not data:
    embedded = len(rebuild_data.train_meta["label"])
    phases.scale_last(total_train / embedded, f"projected from {embedded} images")
  rebuild_s = phases.rows[-1]["wall s"]
  if args.checkpoint:
    variables, _ = builders.restore_model_variables(config, model, args.checkpoint, mesh,
                                                    hint="give a stage workdir or weights file")
  evaluator = builders.make_evaluator(config, model, data, mesh)
  needed = evaluator.needed_rows
  if args.sample and args.sample < len(needed):
    embedded = needed[spread(len(needed), args.sample)]
    embeddings = phases.run("evaluation: extraction", lambda: evaluator.embed(
        variables, rows=embedded), notes=f"{len(needed)} test images")
    phases.scale_last(len(needed) / len(embedded), f"projected from {len(embedded)} images")
    results = phases.run("evaluation: scoring", lambda: evaluator.score(embeddings),
                         notes=f"{len(evaluator.protocols)} protocol trials (sampled "
                         "features: numbers not meaningful)")
    eval_s = phases.rows[-2]["wall s"] + phases.rows[-1]["wall s"]
  else:
    results = phases.run("evaluation (full protocol)", lambda: evaluator.run(variables),
                         notes=f"{len(evaluator.protocols)} protocol trials")
    eval_s = phases.rows[-1]["wall s"]
  if args.checkpoint:
    config.eval.checkpoint = args.checkpoint
    phases.run("export", lambda: stages.export_stage(
        config, args.workdir,
        stage_parts.make_evaluation_parts(config, None, "export", workdir=args.workdir)),
               disk=os.path.join(args.workdir, "export"))
  else:
    phases.skip("export", "skipped: needs --checkpoint")
  steps_per_epoch = {
      "teacher": stage_parts.stage_steps_per_epoch(config.teacher.steps_per_epoch, config, data),
      "student": stage_parts.stage_steps_per_epoch(config.distill.steps_per_epoch, config, data)}
  seconds = projected_seconds(config, steps_per_epoch, per_step, rebuild_s, eval_s)
  projection = ("projected full run: not computed (a step was not timed)" if seconds is None else
                f"projected full run ({config.teacher.epochs} teacher + {config.distill.epochs} "
                f"student epochs of {steps_per_epoch['teacher']} / {steps_per_epoch['student']} "
                f"steps): {seconds / 3600:.1f} h wall ({seconds:.0f} s)")
  headline = next(iter(results.values()))["mean"]
  accuracy = ("sampled features: no accuracy" if args.sample and args.sample < len(needed) else
              f"first setting {next(iter(results))}: R1 {100 * headline['cmc'][0]:.2f}, "
              f"mAP {100 * headline['mAP']:.2f}")
  text = "\n".join([
      f"Full-size rehearsal: {jax.devices()[0].device_kind} x{jax.device_count()}, "
      f"{config.model.depth}-layer ResNet width {config.model.width}, "
      f"{config.data.image_height}x{config.data.image_width}, batch "
      f"{2 * train_step.pairs_per_step(config)} images, {len(data.train_meta['label'])} "
      f"training and {len(data.test_meta['label'])} test images", "",
      phases.table(), "", projection, "", accuracy])
  write_text(table_path, text)
  print(text, flush=True)
  return text


if __name__ == "__main__":
  main()
