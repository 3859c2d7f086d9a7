"""Checkpoints: the train state and JSON metadata, written by Orbax; weights-only restores.

Sits at the end of the training loop: `CheckpointManager.save` is called every
`checkpoint.every_steps` steps and at each evaluation. The data position needs no item of its
own: every batch is a pure function of (seed, step), so the restored step is the data position
and a resumed run sees exactly the batches an uninterrupted run would have seen, with any
`data.num_workers` and any process count. Each step directory `<dir>/<step>/` holds

  state/     the state pytree of arrays (Orbax StandardSave; restored onto an abstract target
             built for the CURRENT mesh, so a run saved on one device layout restores on another)
  metadata/  JSON: the resolved config, stage, step, epoch, and "evaluation" (the metrics of an
             evaluated step, which rank the checkpoints)

Orbax writes every step into a temporary directory and renames it when complete, so a crash
mid-write leaves the previous step restorable; leftover temporary directories are ignored when
listing steps and removed when a writable manager opens the directory.

Kept checkpoints: the newest `keep_last` AND the best `keep_best` by `best_metric` (mAP, higher is
better), whichever way a step qualifies (an Orbax AnyPreservationPolicy of LatestN and our own
`BestByEvaluation`). The evaluation metrics of a step live in its metadata ("evaluation"), so
the best step survives a reopen without Orbax's `best_fn`, which expects metrics on every save.

Resume order (`find_resume_checkpoint`):
  1. a complete checkpoint in the run's own checkpoint directory (the run was interrupted);
  2. else the explicit `checkpoint.resume` path, when one is named (a step directory or a
     checkpoint directory, whose newest step is taken); a named path that is missing or holds no
     complete checkpoint is an error, never a silent fresh start;
  3. else nothing: the caller starts from the initial weights.
Before a resumed run continues, its config is compared with the checkpoint's (`diff_configs`);
a difference is refused unless `checkpoint.allow_config_change` is set.

Which checkpoint a finished stage hands on, and restoring its model variables alone, live in
`stage_checkpoints.py`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dakd_jax import errors
from dakd_jax.errors import CheckpointError, CheckpointNotFoundError

STATE, METADATA = "state", "metadata"
VARIABLE_COLLECTIONS = ("params", "batch_stats")

# Config fields that may change between a run and its resume without changing the result:
# paths, logging, checkpoint bookkeeping, the number of loader workers (batches are a function
# of the step), how the same values are computed (recomputation in the backward pass, which
# convolution gradient, the student's grouped or two-call forward). Patterns are fnmatch-style
# on dotted names.
RESUME_IGNORED_FIELDS = (
    "stage", "checkpoint.*", "log.*", "data.root", "data.prepared_dir", "data.num_workers",
    "distill.teacher_checkpoint", "eval.*", "extract.*", "model.remat", "model.conv_backward",
    "distill.student_forward",
)
# With pretrain.enabled the teacher and student start from the file the pretrain stage wrote in
# the workdir (train/pretrain.pretrained_init); their configs name it by its absolute path,
# which moves with the workdir. Compared by its place in the workdir, a copied or moved workdir
# resumes.
PRETRAINED_INIT_TAIL = os.path.join("pretrain", "backbone.npz")
PRETRAINED_INIT_IN_WORKDIR = os.path.join("<workdir>", PRETRAINED_INIT_TAIL)
# A refused resume lists at most this many differing fields (then "and N more").
MAX_LISTED_DIFFERENCES = 5


def to_json_tree(value: Any) -> Any:
  """Returns `value` with tuples as lists and NumPy/JAX scalars and arrays as Python values.

  Raises:
    TypeError: a leaf is not a str, bool, int, float, None, NumPy or JAX value.
  """
  if isinstance(value, dict) or hasattr(value, "to_dict"):
    items = value.to_dict() if hasattr(value, "to_dict") else value
    return {str(k): to_json_tree(v) for k, v in items.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_tree(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(jax.device_get(value)).tolist()
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  raise TypeError(f"cannot store {type(value).__name__} value {value!r} in checkpoint JSON; "
                  "pass str, bool, int, float, None, lists, dicts or NumPy values")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Flattens nested dicts to {"a.b.c": leaf} with JSON-normalised leaves."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _in_any_workdir(flat: dict[str, Any]) -> dict[str, Any]:
  """`flat` with a model.init_weights derived from the workdir's pretrain stage written as
  PRETRAINED_INIT_IN_WORKDIR (the same in every copy of the workdir)."""
  weights = flat.get("model.init_weights")
  if (flat.get("pretrain.enabled") and isinstance(weights, str)
      and weights.endswith(os.sep + PRETRAINED_INIT_TAIL)):
    return {**flat, "model.init_weights": PRETRAINED_INIT_IN_WORKDIR}
  return flat


def diff_configs(old: dict, new: dict,
                 ignore: tuple[str, ...] = RESUME_IGNORED_FIELDS) -> list[str]:
  """Lists the config fields that differ between a checkpoint and the current run.

  Args:
    old: the checkpoint's config (nested dicts, as stored in its metadata).
    new: the current config (nested dicts or a ConfigDict); tuples and lists compare equal.
    ignore: fnmatch patterns on dotted field names ("log.*", "data.root") left out.

  Returns:
    Sorted lines "field: old -> new"; a field present on one side only shows "<absent>".
    Empty when the configs agree. The pretrain stage's weights file (model.init_weights with
    pretrain.enabled) compares by its place in the workdir, so a moved workdir resumes.
  """
  old_flat = _in_any_workdir(_flatten(to_json_tree(old)))
  new_flat = _in_any_workdir(_flatten(to_json_tree(new)))
  lines = []
  for name in sorted(set(old_flat) | set(new_flat)):
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore):
      continue
    before = old_flat.get(name, "<absent>")
    after = new_flat.get(name, "<absent>")
    if before != after:
      lines.append(f"{name}: {before!r} -> {after!r}")
  return lines


def check_config_change(old: dict, new: dict, allow_config_change: bool,
                        ignore: tuple[str, ...] = RESUME_IGNORED_FIELDS,
                        source: str = "the checkpoint") -> list[str]:
  """Refuses to resume under a different config unless allowed; logs the differences.

  Returns:
    The differing fields (see `diff_configs`).

  Raises:
    CheckpointError: the configs differ and `allow_config_change` is False; the message lists the
      fields and names `checkpoint.allow_config_change` as the switch.
  """
  differences = diff_configs(old, new, ignore)
  if not differences:
    return differences
  if not allow_config_change:
    # One line (cli.report_error prints it as the run's only message); the first few fields.
    shown = "; ".join(differences[:MAX_LISTED_DIFFERENCES])
    more = len(differences) - MAX_LISTED_DIFFERENCES
    shown += f"; and {more} more" if more > 0 else ""
    raise CheckpointError(
        f"the config differs from {source}'s in {len(differences)} field(s): {shown}. Run with "
        "the checkpoint's values, use another --workdir, or set "
        "--config.checkpoint.allow_config_change=True to resume anyway")
  listing = "\n  ".join(differences)
  logging.warning("resuming with a config that differs from %s's:\n  %s", source, listing)
  return differences


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """Returns the sorted steps with a complete (committed) checkpoint under `directory`.

  Temporary directories of interrupted writes are not counted. A missing directory gives [].
  """
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(path))


def _is_step_directory(path: epath.Path) -> bool:
  return path.name.isdigit() and (path / STATE).is_dir()


def find_resume_checkpoint(workdir_ckpt_dir: str | os.PathLike,
                           explicit_path: str | os.PathLike | None
                           ) -> tuple[str, int] | None:
  """Picks the checkpoint to resume from, in the module's resume order.

  Args:
    workdir_ckpt_dir: this run's own checkpoint directory (may not exist yet).
    explicit_path: `checkpoint.resume`: a checkpoint directory (its newest complete step is
      used) or one step directory `<dir>/<step>`; "" or None when not set.

  Returns:
    (checkpoint directory, step) to pass to `CheckpointManager(directory).restore(step, ...)`,
    or None when nothing is to be resumed (start from the initial weights).

  Raises:
    CheckpointNotFoundError: `explicit_path` is named but does not exist or holds no complete
      checkpoint.
  """
  own_steps = complete_steps(workdir_ckpt_dir)
  if own_steps:
    return os.fspath(workdir_ckpt_dir), own_steps[-1]
  if not explicit_path:
    return None
  path = epath.Path(explicit_path)
  if not path.exists():
    raise CheckpointNotFoundError(
        f"checkpoint.resume={os.fspath(explicit_path)!r} does not exist; fix the path or set "
        "--config.checkpoint.resume='' to start from the initial weights")
  if _is_step_directory(path) and int(path.name) in complete_steps(path.parent):
    return os.fspath(path.parent), int(path.name)
  steps = complete_steps(path)
  if not steps:
    raise CheckpointNotFoundError(
        f"checkpoint.resume={os.fspath(explicit_path)!r} holds no complete checkpoint (expected "
        "step directories <dir>/<step>/ with state/, data/, metadata/); point it at a "
        "checkpoint directory or one of its step directories")
  return os.fspath(path), steps[-1]


@dataclasses.dataclass
class BestByEvaluation:
  """Orbax preservation policy: keep the `n` steps with the highest score in `scores`.

  `scores` (step -> metric) is owned by the CheckpointManager, which fills it from the steps'
  metadata when it opens and at every evaluated save; steps without a score are not kept by
  this policy (LatestN keeps the newest ones).
  """
  n: int
  scores: dict

  def should_preserve(self, checkpoints, *, context):
    del context  # Nothing of the save context matters here.
    ranked = sorted((step for step in (c.step for c in checkpoints) if step in self.scores),
                    key=lambda step: (-self.scores[step], step))
    best = set(ranked[:self.n])
    return [c.step in best for c in checkpoints]


class CheckpointManager:
  """Saves and restores (state, metadata) under one directory.

  All processes call every method (Orbax synchronises them). Saves are asynchronous: `save`
  returns once the arrays are copied off the devices (so the caller may donate the state to the
  next step) and the files are written in the background; call `wait()` before reading a
  checkpoint back and `close()` before exiting.
  """

  def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, keep_best: int = 1,
               best_metric: str = "mAP", read_only: bool = False, use_async: bool = True):
    """Opens (and, unless read_only, creates) a checkpoint directory.

    Args:
      directory: where the step directories live.
      keep_last: the newest N checkpoints are kept (>= 1).
      keep_best: the best N by `best_metric` are also kept (>= 0); only steps saved with
        `metrics` containing `best_metric` compete.
      best_metric: key in the `metrics` dict passed to `save`; higher is better.
      read_only: open for restoring only (no directory creation, no clean-up, no saves).
      use_async: write in a background thread (False: `save` returns when files are written).

    Raises:
      ValueError: keep_last < 1 or keep_best < 0.
      StorageError: a writable manager's directory cannot be created or written.
    """
    if keep_last < 1 or keep_best < 0:
      raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1 and "
                       f"checkpoint.keep_best={keep_best} must be >= 0")
    # Orbax (tensorstore OCDBT) needs absolute paths; relative ones come from the command line.
    self.directory = os.path.abspath(os.fspath(directory))
    self.best_metric = best_metric
    self._what = f"checkpoint in {self.directory}"
    if not read_only and jax.process_index() == 0:
      # Found now rather than in Orbax's background save, whose failure surfaces only later,
      # after Orbax has logged it from several threads.
      errors.check_writable_folder(self.directory, self._what)
    self._scores = {}
    preservation = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep_last),
        BestByEvaluation(n=keep_best, scores=self._scores),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=use_async,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       METADATA: ocp.JsonCheckpointHandler()})
    for step in self._manager.all_steps():
      metrics = self.step_metrics(step)
      if metrics and best_metric in metrics:
        self._scores[step] = float(metrics[best_metric])

  def save(self, step: int, state: Any, metadata: dict, metrics: dict | None = None) -> bool:
    """Starts writing checkpoint `step` (asynchronously unless use_async=False).

    Args:
      step: the global training step (the step directory's name; also the data position).
      state: pytree of arrays (jax.Array, NumPy or Python scalars).
      metadata: JSON-able dict (config, epoch, metrics, ...); "step" is added if absent.
      metrics: validation metrics of this step, e.g. {"mAP": 0.61}; makes the step a candidate
        for the keep-best policy. None for steps without an evaluation.

    Returns:
      True if a save started; False (with a warning) if `step` is not newer than the latest
      checkpoint and no metrics were given.

    Raises:
      ValueError: `metrics` lacks `best_metric`, or `metrics` are given for a step that is not
        newer than the latest checkpoint (the step could never become the best one; save once
        per step, with the metrics when the step was evaluated).
      TypeError: metadata holds a value JSON cannot store.
    """
    if metrics is not None and self.best_metric not in metrics:
      raise ValueError(f"metrics {sorted(metrics)} lack {self.best_metric!r}, which ranks "
                       "checkpoints; pass it or save with metrics=None")
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      if metrics is not None:
        raise ValueError(f"step {step} with metrics {metrics} cannot be saved: {self.directory} "
                         f"already has step {latest}; save each step once, with its metrics")
      logging.warning("checkpoint step %d not saved: %s already has step %d", step,
                      self.directory, latest)
      return False
    metadata = to_json_tree(dict(metadata))
    metadata.setdefault("step", int(step))
    if metrics is not None:
      metadata["evaluation"] = to_json_tree(metrics)
      self._scores[int(step)] = float(metrics[self.best_metric])
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 METADATA: ocp.args.JsonSave(metadata)})
    with errors.writing(self._what):  # Also raises a failure of the previous background save.
      return self._manager.save(int(step), args=args)

  def wait(self) -> None:
    """Blocks until pending saves are written and old steps deleted; raises their errors (a
    full or read-only disk as StorageError)."""
    with errors.writing(self._what):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads; raises as `wait`."""
    with errors.writing(self._what):
      self._manager.close()

  def all_steps(self) -> list[int]:
    """Returns the sorted steps the manager holds (pending saves included)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Returns the newest step, or None when there is none."""
    return self._manager.latest_step()

  def step_metrics(self, step: int) -> dict | None:
    """The evaluation metrics a step was saved with (its metadata's "evaluation", or the Orbax
    metrics file of checkpoints from earlier versions), or None."""
    metadata = self.read_metadata(step)
    metrics = metadata.get("evaluation") or self._manager.metrics(step)
    return dict(metrics) if metrics else None

  def best_step(self) -> int | None:
    """Returns the step with the highest `best_metric` (the earliest on ties), or None when no
    step was saved with metrics."""
    self.wait()
    present = set(self.all_steps())
    scored = [(score, -step) for step, score in self._scores.items() if step in present]
    return -max(scored)[1] if scored else None

  def read_metadata(self, step: int) -> dict:
    """Returns the metadata dict of `step` without touching the state (waits for saves)."""
    self.wait()
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
    return restored[METADATA]

  def restore(self, step: int, abstract_state: Any, *, config: dict | None = None,
              allow_config_change: bool = False,
              ignore_fields: tuple[str, ...] = RESUME_IGNORED_FIELDS) -> tuple[Any, dict]:
    """Restores checkpoint `step` onto the current devices.

    Args:
      step: a step from `all_steps()`.
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings for the CURRENT mesh
        (e.g. from `jax.eval_shape` plus `replicated(mesh)`), same structure as the saved
        state; the arrays come back with these shardings whatever layout wrote them.
      config: the current config; when given it is compared with the checkpoint's
        metadata["config"] before anything heavy is read.
      allow_config_change: resume even if the configs differ (the differences are logged).
      ignore_fields: config fields left out of the comparison (fnmatch patterns).

    Returns:
      (state, metadata).

    Raises:
      CheckpointError: the configs differ and allow_config_change is False, or the saved state
        does not have the target's structure or shapes.
      CheckpointNotFoundError: `step` is not in this directory.
    """
    self.wait()
    if step not in self._manager.all_steps():
      raise CheckpointNotFoundError(f"no complete checkpoint for step {step} in "
                                    f"{self.directory}; steps present: {self.all_steps()}")
    metadata = self.read_metadata(step)
    if config is not None:
      check_config_change(metadata.get("config", {}), config, allow_config_change,
                          ignore_fields, source=f"checkpoint {self.directory}/{step}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract_state)}))
    except ValueError as error:
      raise CheckpointError(
          f"cannot restore {self.directory}/{step}: its state does not fit this run "
          f"({first_line(error)}); was it written by another stage or model?") from error
    return restored[STATE], metadata


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of an exception's message, cut to `limit` characters (for one-line
  errors that wrap a library's long message)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."
