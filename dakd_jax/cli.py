"""Stage dispatch for `run.py` and notebooks: pretrain (optional), teacher, student, eval, all
in sequence, or extract.

Validation happens here, once, before any data is touched or anything compiles. Each stage
writes under the workdir:
  <workdir>/config.json              the resolved config
  <workdir>/pretrain/                only with pretrain.enabled: its run and backbone.npz
  <workdir>/teacher/                 teacher checkpoints, metrics.jsonl, TensorBoard events
  <workdir>/student/                 the same for the DAKD student
  <workdir>/eval/                    results.json, features.npz, pictures (and <workdir>/report.md)
  <workdir>/extract/                 stage=extract: embeddings of new image folders, a ranking
"""
from __future__ import annotations

import json
import os
import sys

import ml_collections

from dakd_jax import config as config_lib


def default_workdir(config_path: str | None) -> str:
  """workdirs/<config file name> (e.g. workdirs/demo), or workdirs/run without a path."""
  name = os.path.splitext(os.path.basename((config_path or "run").split(":")[0]))[0]
  return os.path.join("workdirs", name)


def write_resolved_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes <workdir>/config.json and returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    json.dump(config_lib.to_dict(config), f, indent=2, sort_keys=True)
  return path


def initialize_distributed(coordinator_address: str, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-process run (jax.distributed) before any device is touched.

  On CPU the cross-process collectives go through gloo. Each process then loads only its slice
  of every global batch; process 0 alone writes logs and prepares data.
  """
  import jax  # Deferred like the other heavy imports.
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def run_stages(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the stages `config.stage` names; returns {stage: result}."""
  if config.stage == "extract":  # New images only: no dataset needed (for a student).
    from dakd_jax.evaluation import folders
    return {"extract": folders.extract_stage(config, workdir)}
  from dakd_jax.data import prepare  # Deferred: heavy imports only once the config is valid.
  from dakd_jax.evaluation import evaluate
  from dakd_jax.train import loop
  from dakd_jax.train import pretrain

  results = {}
  pretrain_dir = os.path.join(workdir, "pretrain")
  if config.pretrain.enabled and config.stage in ("pretrain", "all"):
    results["pretrain"] = pretrain.train_pretrain(config, pretrain_dir)
  if config.stage == "pretrain":
    return results
  data = prepare.prepare_data(config)
  teacher_dir = os.path.join(workdir, "teacher")
  student_dir = os.path.join(workdir, "student")
  if config.stage in ("teacher", "student", "all"):
    # Both start from the pretrain stage's weights when it is enabled (method.md 2.4: ImageNet).
    initial = pretrain.with_pretrained_init(config, pretrain_dir)
  if config.stage in ("teacher", "all"):
    results["teacher"] = loop.train_teacher(initial, teacher_dir, data)
  if config.stage in ("student", "all"):
    teacher_source = config.distill.teacher_checkpoint or teacher_dir
    results["student"] = loop.train_student(initial, student_dir, data, teacher_source)
  if config.stage in ("eval", "all"):
    results["eval"] = evaluate.evaluate_stage(config, workdir, data)
  return results


def main(config: ml_collections.ConfigDict, workdir: str | None = None, *,
         config_path: str | None = None, print_only: bool = False) -> int:
  """Validates the config, then runs its stages (or prints it). Returns a process exit code."""
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as error:
    print(f"dakd_jax: invalid config: {error}", file=sys.stderr)
    return 2
  if print_only:
    print(json.dumps(config_lib.to_dict(config), indent=2, sort_keys=True))
    return 0
  import jax  # Validation above already initialised the backend.
  # Absolute: Orbax refuses relative checkpoint paths, and a notebook may change directory.
  workdir = os.path.abspath(workdir or default_workdir(config_path))
  if jax.process_index() == 0:
    path = write_resolved_config(config, workdir)
    print(f"dakd_jax: stage={config.stage} workdir={workdir} (resolved config: {path}, "
          f"{jax.device_count()} device(s), {jax.process_count()} process(es))")
  from dakd_jax.data.records import DatasetError
  from dakd_jax.models.weights import WeightsError
  from dakd_jax.train.loop import NonFiniteLossError
  # Bad input and diverged runs end with their message; anything else keeps its traceback.
  try:
    run_stages(config, workdir)
  except (DatasetError, config_lib.ConfigError, FileNotFoundError, WeightsError,
          NonFiniteLossError) as error:
    print(f"dakd_jax: error: {error}", file=sys.stderr)
    return 1
  return 0
