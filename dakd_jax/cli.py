"""Stage dispatch for `run.py` and notebooks, and the one place user mistakes become messages.

`run_stages` runs pretrain (optional), teacher, student, eval (`all` in sequence), or extract.
Validation happens before any data is touched or anything compiles. Each stage writes under the
workdir:
  <workdir>/config.json              the resolved config of the training stages
  <workdir>/pretrain/                only with pretrain.enabled: its run and backbone.npz
  <workdir>/teacher/                 teacher checkpoints, metrics.jsonl, TensorBoard events
  <workdir>/student/                 the same for the DAKD student
  <workdir>/eval/                    config.json, results.json, features.npz, pictures
  <workdir>/extract/                 stage=extract: embeddings of new image folders, a ranking

A `UserError` (dakd_jax.errors) ends the run with its one-line message on stderr and a non-zero
exit; with `--verbosity` given, the traceback is shown too. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Iterable

import ml_collections

from dakd_jax import config as config_lib
from dakd_jax import errors

TRAINING_STAGES = ("pretrain", "teacher", "student", "all")
EXIT_CONFIG, EXIT_RUN = 2, 1


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


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, before anything is written, a run whose stage checkpoints hold another config."""
  from dakd_jax import checkpoint as checkpoint_lib  # Deferred: pulls in Orbax.
  stages = {"all": ("pretrain", "teacher", "student")}.get(config.stage, (config.stage,))
  for stage in stages:
    if stage == "pretrain":
      continue  # Its config is derived from this one; the teacher's check covers the rest.
    directory = os.path.join(workdir, stage, "checkpoints")
    steps = checkpoint_lib.complete_steps(directory)
    if steps and not config.checkpoint.allow_config_change:
      stored = checkpoint_lib.read_step_metadata(directory, steps[-1]).get("config", {})
      checkpoint_lib.check_config_change(stored, config.to_dict(), False,
                                         source=f"checkpoint {directory}/{steps[-1]}")


def run_stages(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the stages `config.stage` names; returns {stage: result}."""
  from dakd_jax import builders  # Deferred: heavy imports only once the config is valid.
  from dakd_jax import stages
  from dakd_jax.train import loop
  from dakd_jax.train import pretrain
  if config.stage == "extract":  # New images only: no dataset needed.
    return {"extract": stages.extract_stage(config, workdir)}
  results = {}
  pretrain_dir = os.path.join(workdir, "pretrain")
  if config.pretrain.enabled and config.stage in ("pretrain", "all"):
    results["pretrain"] = pretrain.train_pretrain(config, pretrain_dir)
  if config.stage == "pretrain":
    return results
  data = builders.prepare_data(config)
  if config.stage in ("teacher", "student", "all"):
    # Both start from the pretrain stage's weights when it is enabled (method.md 2.4: ImageNet).
    initial = pretrain.with_pretrained_init(config, pretrain_dir)
  if config.stage in ("teacher", "all"):
    results["teacher"] = loop.train_teacher(initial, os.path.join(workdir, "teacher"), data)
  if config.stage in ("student", "all"):
    teacher_source = config.distill.teacher_checkpoint or os.path.join(workdir, "teacher")
    results["student"] = loop.train_student(initial, os.path.join(workdir, "student"), data,
                                            teacher_source)
  if config.stage in ("eval", "all"):
    results["eval"] = stages.evaluate_stage(config, workdir, data)
  return results


def start(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validated config -> checks, the resolved config in the workdir, then `run_stages`."""
  import jax  # Validation already initialised the backend.
  workdir = os.path.abspath(workdir)  # Orbax refuses relative paths; notebooks change directory.
  if config.stage in TRAINING_STAGES:
    check_resumable(config, workdir)
    if jax.process_index() == 0:
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


def main_from_args(config_args: Iterable[str], workdir: str | None = None, *,
                   print_only: bool = False, distributed=(None, None, None),
                   verbose: bool = False) -> int:
  """The command line's path: `--config` arguments -> validated config -> stages. Returns a
  process exit code."""
  config_args = list(config_args)
  try:
    coordinator, num_processes, process_id = distributed
    if coordinator:
      initialize_distributed(coordinator, num_processes, process_id)
    config = config_lib.config_from_args(config_args)
    config_lib.validate(config)
    if print_only:
      print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
      return 0
    start(config, workdir or default_workdir(config_args))
  except Exception as error:  # pylint: disable=broad-except  # report_error re-raises bugs.
    return report_error(error, verbose)
  return 0
