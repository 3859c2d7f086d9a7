"""Stage dispatch for `run.py` and notebooks, and the one place user mistakes become messages.

`run_stages` runs pretrain (optional), teacher, student, eval (`all` in sequence), extract or
export.
Validation happens before any data is touched or anything compiles. Each stage writes under the
workdir:
  <workdir>/config.json              the resolved config of the training stages
  <workdir>/pretrain/                only with pretrain.enabled: its run and backbone.npz
  <workdir>/teacher/                 teacher checkpoints, metrics.jsonl, TensorBoard events
  <workdir>/student/                 the same for the DAKD student
  <workdir>/.lock                    held while a run writes the workdir (`workdir_lock`)
  <workdir>/eval/                    config.json, results.json, features.npz, pictures (other
                                     checkpoints or settings: eval/<tag>/), index.json
  <workdir>/stages.json              stage=all: untrained, initial weights, teacher, student on
                                     one protocol (also printed last)
  <workdir>/extract/                 stage=extract: embeddings of new image folders, a ranking
  <workdir>/export/                  stage=export: ONNX and StableHLO files, manifest.json

Before anything is written, `start` checks what would fail later: a file where a folder is
needed, a resume under another config, unreadable weights, a non-teacher checkpoint given as the
teacher. A `UserError` (dakd_jax.errors) ends the run with its one-line message on stderr and a
non-zero exit (2 for a config mistake, else 1); with `--verbosity` given, the traceback is shown
too. A full or read-only disk is a `StorageError`, also when a library thread hit it. SIGTERM (a
scheduler's preemption) and SIGINT stop the run after the training loop has checkpointed its
last step (dakd_jax.interrupts), with one line and exit 128 + the signal (143, 130). Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from typing import Iterable

import ml_collections

from dakd_jax import config as config_lib
from dakd_jax import errors
from dakd_jax import interrupts

TRAINING_STAGES = ("pretrain", "teacher", "student", "all")
EXIT_CONFIG, EXIT_RUN = 2, 1
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT


def default_workdir(config_args: Iterable[str]) -> str:
  """workdirs/<config file name> (e.g. workdirs/demo), or workdirs/run without a file."""
  files = [a.split("=", 1)[1] for a in config_args if a.startswith("--config=")]
  name = os.path.splitext(os.path.basename((files[0] if files else "run").split(":")[0]))[0]
  return os.path.join("workdirs", name)


def initialize_distributed(coordinator_address: str, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-process run (jax.distributed) before any device is touched.

  On CPU the cross-process collectives go through gloo. Each process then loads only its slice
  of every global batch; process 0 alone writes logs and prepares data.
  """
  import jax  # Deferred like the other heavy imports.
  if num_processes is None or process_id is None:
    raise errors.ConfigError("--coordinator_address needs --num_processes and --process_id")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def check_output_folders(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a file where the run needs a folder: --workdir, config.data.prepared_dir."""
  for path, flag, example in ((workdir, "--workdir", "workdirs/run"),
                              (config.data.prepared_dir, "--config.data.prepared_dir",
                               "data/tfds")):
    blocking = errors.file_in_the_way(path)
    if blocking is not None:
      raise errors.ConfigError(f"{flag}={path}: {blocking} is a file, not a folder; give a "
                               f"folder (it is created when missing), e.g. {flag}={example}")


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, before anything is written, a run whose stage checkpoints hold another config.

  The teacher and student store the config they ran with: with pretraining, the one whose
  model.init_weights is the pretrain stage's file, so that is the config compared.
  """
  from dakd_jax import checkpoint as checkpoint_lib  # Deferred: pulls in Orbax.
  from dakd_jax import stage_checkpoints
  from dakd_jax.train import pretrain
  expected = pretrain.pretrained_init(config, os.path.join(workdir, "pretrain")).to_dict()
  stages = {"all": ("pretrain", "teacher", "student")}.get(config.stage, (config.stage,))
  for stage in stages:
    if stage == "pretrain":
      continue  # Its config is derived from this one; the teacher's check covers the rest.
    directory = os.path.join(workdir, stage, "checkpoints")
    steps = checkpoint_lib.complete_steps(directory)
    if steps and not config.checkpoint.allow_config_change:
      stored = stage_checkpoints.read_step_metadata(directory, steps[-1]).get("config", {})
      checkpoint_lib.check_config_change(stored, expected, False,
                                         source=f"checkpoint {directory}/{steps[-1]}")


def run_seed_band(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """config.seeds: the stages once per seed in <workdir>/seed_<s>/, then every setting's
  numbers per seed with mean +- std, printed and written to <workdir>/seeds.json and
  <workdir>/seeds.md."""
  def with_seed(derived, seed):
    derived.seed, derived.seeds = seed, ()
  return _run_band(config, workdir, "seed", config.seeds, with_seed)


def run_trial_band(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """config.data.trials (RegDB): the stages once per trial in <workdir>/trial_<t>/, each
  trained on its own split and resumed there, then every setting (both directions) per trial
  with mean +- std, printed and written to <workdir>/trials.json and <workdir>/trials.md."""
  def with_trial(derived, trial):
    derived.data.trial, derived.data.trials = trial, ()
  return _run_band(config, workdir, "trial", config.data.trials, with_trial)


def _run_band(config: ml_collections.ConfigDict, workdir: str, kind: str, values,
              derive) -> dict:
  """The stages once per value in <workdir>/<kind>_<value>/ (`derive(config copy, value)`
  sets it), then the band of their evaluations in <workdir>/<kind>s.json and <kind>s.md, each
  labelled with the checkpoint selection rule. Returns {'<kind>s': band} ({} without eval)."""
  import copy  # Only for the per-value configs.
  from dakd_jax.evaluation import report  # Deferred like run_stages' imports.
  per_value = {}
  for value in values:
    derived = copy.deepcopy(config)
    derive(derived, value)
    folder = os.path.join(workdir, f"{kind}_{value}")
    if jax_process_index() == 0:
      print(f"dakd_jax: {kind} {value} -> {folder}", flush=True)
    results = start(derived, folder)
    if "eval" in results:
      per_value[value] = results["eval"]
  if not per_value:
    return {}
  band = report.seed_band({value: summary["results"] for value, summary in per_value.items()})
  selection = next(iter(per_value.values()))["checkpoint_selection"]
  if jax_process_index() == 0:
    text = report.format_seed_band(band, kind=kind)
    print("\n" + text)
    # Each setting's per-value numbers under "<kind>s" ("seeds", "trials").
    stored = {setting: {(f"{kind}s" if key == "seeds" else key): value
                        for key, value in entry.items()} for setting, entry in band.items()}
    with open(os.path.join(workdir, f"{kind}s.json"), "w") as f:
      json.dump({f"{kind}s": list(per_value), "settings": stored,
                 "checkpoint_selection": selection}, f, indent=2)
    with open(os.path.join(workdir, f"{kind}s.md"), "w") as f:
      f.write(f"Checkpoint selection: {selection}\n\n```\n{text}\n```\n")
  return {f"{kind}s": band}


def jax_process_index() -> int:
  import jax  # Deferred: initialised by validation.
  return jax.process_index()


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Opens, before any data is prepared, the weights and checkpoints the stages will load: a
  weights file must be readable (its header), a teacher checkpoint must be a teacher's; and
  stage=extract's image folders must hold images."""
  from dakd_jax import stage_checkpoints  # Deferred: pulls in Orbax.
  from dakd_jax.models import weight_files  # Deferred like the other heavy imports.
  training = config.stage in ("teacher", "student", "all")
  files = [config.model.init_weights] if training else []
  if config.stage in ("eval", "extract"):
    files.append(config.eval.checkpoint)
  teacher = config.distill.teacher_checkpoint if config.stage in ("student", "all") else ""
  files.append(teacher)
  for path in files:
    if path and os.path.isfile(path):
      weight_files.read_weights_header(path)
  if config.stage == "extract":
    from dakd_jax.evaluation import folders  # Deferred like the other heavy imports.
    for folder in (config.extract.query_dir, config.extract.gallery_dir):
      if folder:
        folders.check_folder(folder)
  if teacher and os.path.isdir(teacher):
    directory, step = stage_checkpoints.find_stage_checkpoint(
        teacher, hint="point --config.distill.teacher_checkpoint at a teacher workdir")
    stage = stage_checkpoints.read_step_metadata(directory, step).get("stage", "teacher")
    if stage != "teacher":
      raise errors.CheckpointError(
          f"config.distill.teacher_checkpoint = {teacher!r} holds a {stage} checkpoint "
          f"({directory} step {step}); the student needs a teacher's: point it at a teacher "
          "workdir (<workdir>/teacher), its checkpoints/ folder or a teacher weights file")


def run_stages(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the stages `config.stage` names; returns {stage: result}.

  The config is read here and in what it calls to build each stage's parts
  (`stage_parts`), once per stage, right before the stage runs; the stages take the parts.
  """
  from dakd_jax import builders  # Deferred: heavy imports only once the config is valid.
  from dakd_jax import stage_parts
  from dakd_jax import stages
  from dakd_jax.train import loop
  from dakd_jax.train import pretrain
  builders.check_settings(config)  # Notebooks come here directly, after load_config.
  if config.stage in ("extract", "export"):  # A trained network only: no dataset needed.
    parts = stage_parts.make_evaluation_parts(config, None, config.stage, workdir=workdir)
    run = stages.extract_stage if config.stage == "extract" else stages.export_stage
    return {config.stage: run(config, workdir, parts)}
  results = {}
  pretrain_dir = os.path.join(workdir, "pretrain")
  if config.stage != "pretrain":
    data = builders.prepare_data(config)
  if config.stage == "all":
    # Each stage builds its evaluator before it trains; the later stages' are checked now,
    # before pretraining and the teacher run, so what they would refuse is refused at once.
    builders.check_evaluation(config, data, during_training=True)
    builders.check_evaluation(config, data)
  if config.pretrain.enabled and config.stage in ("pretrain", "all"):
    derived = pretrain.pretrain_config(config)
    parts = stage_parts.make_training_parts(derived, builders.prepare_data(derived), "pretrain")
    results["pretrain"] = pretrain.train_pretrain(derived, pretrain_dir, parts)
  if config.stage == "pretrain":
    return results
  if config.stage in ("teacher", "student", "all"):
    # Both start from the pretrain stage's weights when it is enabled (method.md 2.4: ImageNet).
    initial = pretrain.with_pretrained_init(config, pretrain_dir)
  if config.stage in ("teacher", "all"):
    parts = stage_parts.make_training_parts(initial, data, "teacher")
    results["teacher"] = loop.train_teacher(initial, os.path.join(workdir, "teacher"), parts)
  if config.stage in ("student", "all"):
    teacher_source = config.distill.teacher_checkpoint or os.path.join(workdir, "teacher")
    parts = stage_parts.make_training_parts(initial, data, "student",
                                            teacher_source=teacher_source)
    results["student"] = loop.train_student(initial, os.path.join(workdir, "student"), parts)
  if config.stage in ("eval", "all"):
    parts = stage_parts.make_evaluation_parts(config, data, "eval", workdir=workdir)
    results["eval"] = stages.evaluate_stage(config, workdir, parts)
  if config.stage == "all":
    parts = stage_parts.make_evaluation_parts(initial, data, "summary")
    results["stages"] = stages.summarize_stages(initial, workdir, parts)
  return results


def written_folder(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  """(folder, what) a run writes and locks: the workdir, except for stage=extract and
  stage=export, which only read a finished checkpoint and write their own subfolder (so they
  may run beside a training run in the same workdir)."""
  if config.stage in ("extract", "export") and not config.seeds:
    from dakd_jax.evaluation import folders  # Deferred like run_stages' imports.
    subfolder = folders.OUT_DIR if config.stage == "extract" else "export"
    return os.path.join(workdir, subfolder), f"{config.stage} folder"
  return workdir, "workdir"


def start(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validated config -> start-up checks (folders, resume, inputs), the folder it writes proven
  writable and locked (`workdir_lock`: one run per workdir), the resolved config in the
  workdir, then `run_stages` (once per seed of config.seeds when it names any, each seed in its
  own folder). Nothing is written before the checks pass."""
  import contextlib  # Only for the other processes' no-op lock.
  import jax  # Validation already initialised the backend.
  from dakd_jax import workdir_lock  # Deferred like run_stages' imports.
  workdir = os.path.abspath(workdir)  # Orbax refuses relative paths; notebooks change directory.
  check_output_folders(config, workdir)
  if config.stage in TRAINING_STAGES and not (config.seeds or config.data.trials):
    check_resumable(config, workdir)
  check_inputs(config)
  folder, what = written_folder(config, workdir)
  if jax.process_index() != 0:  # Process 0 alone writes the workdir and holds its lock.
    lock = contextlib.nullcontext()
  else:
    errors.check_writable_folder(folder, what)
    # The evaluation folder may be read-only alone.
    if config.stage == "eval" and not (config.seeds or config.data.trials):
      from dakd_jax.evaluation import evaluations  # Deferred like run_stages' imports.
      errors.check_writable_folder(evaluations.evaluation_dir(
          workdir, evaluations.evaluation_tag(config, workdir)), "evaluation folder")
    lock = workdir_lock.hold_lock(folder, what)
  with lock:
    if config.seeds:
      return run_seed_band(config, workdir)
    if config.data.trials:
      return run_trial_band(config, workdir)
    return start_locked(config, workdir)


def start_locked(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`start` once its checks passed and it holds the lock: the resolved config, then the
  stages."""
  import jax  # Validation already initialised the backend.
  if config.stage in TRAINING_STAGES and jax.process_index() == 0:
    from dakd_jax import stages  # Deferred like run_stages' imports.
    stages.write_config(config, workdir)
  if jax.process_index() == 0:
    print(f"dakd_jax: stage={config.stage} workdir={workdir} ({jax.device_count()} device(s), "
          f"{jax.process_count()} process(es))", flush=True)
    if config.stage in TRAINING_STAGES:
      from dakd_jax import builders  # Deferred like run_stages' imports.
      print(f"dakd_jax: {builders.describe_num_workers(config)}", flush=True)
  return run_stages(config, workdir)


def report_error(error: BaseException, verbose: bool) -> int:
  """Prints a user mistake as one line (plus the traceback when verbose); returns the exit code,
  or re-raises anything that is not a user mistake."""
  user_error = error if isinstance(error, errors.UserError) else errors.storage_error(
      error, "output files")
  if user_error is None:
    raise error
  if verbose:
    traceback.print_exception(error)
  kind = "invalid config" if isinstance(user_error, errors.ConfigError) else "error"
  print(f"dakd_jax: {kind}: {user_error}", file=sys.stderr)
  return EXIT_CONFIG if isinstance(user_error, errors.ConfigError) else EXIT_RUN


def report_stopped(stop: interrupts.Stopped, verbose: bool) -> int:
  """A stop signal (SIGTERM from a scheduler, SIGINT): one line saying what was saved and how
  to go on (the traceback only when verbose); exit code 128 + the signal (143, 130)."""
  if verbose:
    traceback.print_exc()
  saved = stop.saved or "each stage keeps its last saved checkpoint"
  print(f"dakd_jax: stopped by {signal.Signals(stop.signal_number).name}: {saved}; run the "
        "same command again to resume from it", file=sys.stderr)
  return stop.exit_code


def report_interrupt(verbose: bool) -> int:
  """Ctrl-C: one line saying how to go on (the traceback only when verbose); exit code 130."""
  if verbose:
    traceback.print_exc()
  print("dakd_jax: interrupted: each stage keeps its last saved checkpoint; run the same "
        "command again to resume from it", file=sys.stderr)
  return EXIT_INTERRUPTED


class BackgroundFailures:
  """Collects storage failures raised in library threads (TensorBoard's event writer), which
  would otherwise print a thread traceback; the run then reports the first as its message.

  Also hides, unless verbose, the "Event loop is closed" errors that tensorstore's write
  callbacks raise when Orbax closes after a failed save (printed as unraisable exceptions, one
  per pending write): the failed save itself ends the run in one line.
  Use as a context manager around a run; other exceptions keep Python's default report.
  """

  def __init__(self, verbose: bool):
    self.verbose = verbose
    self.found: list[errors.StorageError] = []
    self._previous = threading.excepthook
    self._previous_unraisable = sys.unraisablehook

  def _unraisable(self, unraisable) -> None:
    value = unraisable.exc_value
    if self.verbose or not (isinstance(value, RuntimeError)
                            and str(value) == "Event loop is closed"):
      self._previous_unraisable(unraisable)

  def _hook(self, args) -> None:
    storage = errors.storage_error(args.exc_value, "files written in the background") \
        if args.exc_value is not None else None
    if storage is None or self.verbose:
      self._previous(args)
    if storage is not None:
      self.found.append(storage)

  def __enter__(self) -> "BackgroundFailures":
    self._previous, threading.excepthook = threading.excepthook, self._hook
    self._previous_unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
    return self

  def __exit__(self, *exc_info) -> None:
    threading.excepthook = self._previous
    sys.unraisablehook = self._previous_unraisable


def main_from_args(config_args: Iterable[str], workdir: str | None = None, *,
                   print_only: bool = False, distributed=(None, None, None),
                   verbose: bool = False) -> int:
  """The command line's path: `--config` arguments -> validated config -> stages. Returns a
  process exit code."""
  config_args = list(config_args)
  with BackgroundFailures(verbose) as background, interrupts.handle_stop_signals():
    try:
      coordinator, num_processes, process_id = distributed
      if coordinator:
        initialize_distributed(coordinator, num_processes, process_id)
      config = config_lib.config_from_args(config_args)
      config_lib.validate(config)
      from dakd_jax import builders  # Deferred: heavy imports only once the config is valid.
      builders.check_settings(config)
      if print_only:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
      start(config, workdir or default_workdir(config_args))
    except interrupts.Stopped as stop:
      return report_stopped(stop, verbose)
    except KeyboardInterrupt:
      return report_interrupt(verbose)
    except Exception as error:  # pylint: disable=broad-except  # report_error re-raises bugs.
      return report_error(error, verbose)
    if background.found:
      return report_error(background.found[0], verbose)
  return 0
