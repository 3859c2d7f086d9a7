"""Which checkpoint a finished stage hands on, and its model variables alone.

Downstream of training: the student's teacher, `stage=eval`, `stage=extract`, `stage=export`
and the public Extractor all take "a stage run" (its workdir or checkpoints folder) and need one
step of it, chosen by the run's own `checkpoint.select` rule, and only the network's
{"params", "batch_stats"} (restored with Orbax's partial restore onto an abstract target: no
optimiser or memories are built or read).
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax.errors import CheckpointError, CheckpointNotFoundError

# How a run chose the checkpoint it hands on (config checkpoint.select), as reports say it.
SELECTION_LABELS = {"last": "last step", "val": "best validation mAP",
                    "test_oracle": "oracle (test-set selection)"}


def find_stage_checkpoint(source: str, *, hint: str) -> tuple[str, int]:
  """(checkpoint directory, step) a stage run hands on, by its own selection rule (the
  metadata's "selection", config checkpoint.select): its newest step for "last", its best
  evaluated step for "val" and "test_oracle" (and for runs of earlier versions, which chose on
  the test split), else its newest.

  `source` is a stage workdir (holding checkpoints/) or a checkpoint directory; `hint` says how
  to fix a missing one. Raises CheckpointNotFoundError when it holds no complete checkpoint.
  """
  directory = source
  if os.path.isdir(os.path.join(source, "checkpoints")):
    directory = os.path.join(source, "checkpoints")
  steps = checkpoint_lib.complete_steps(directory) if os.path.isdir(directory) else []
  if not steps:
    raise CheckpointNotFoundError(f"no checkpoint in {source!r}: {hint}")
  manager = checkpoint_lib.CheckpointManager(directory, read_only=True)
  try:
    selection = manager.read_metadata(steps[-1]).get("selection", "test_oracle")
    best = None if selection == "last" else manager.best_step()
    step = best or manager.latest_step()
  finally:
    manager.close()
  return os.path.abspath(directory), step


def read_step_metadata(directory: str, step: int) -> dict:
  """The metadata dict saved with `directory`/`step`."""
  manager = checkpoint_lib.CheckpointManager(directory, read_only=True)
  try:
    return manager.read_metadata(step)
  finally:
    manager.close()


def restore_variables(directory: str, step: int, abstract_variables: Any) -> dict:
  """The model variables {"params", "batch_stats"} of a stage checkpoint, nothing else.

  Args:
    directory, step: a checkpoint (see `find_stage_checkpoint`).
    abstract_variables: {"params", "batch_stats"} of `jax.ShapeDtypeStruct` with shardings for
      the current mesh (e.g. `jax.eval_shape` of the model's init, then a sharding).
  Returns:
    The restored variables, placed as the target says.
  Raises:
    CheckpointError: the saved model does not have these variables or shapes (another depth,
      width or stem mode than the config's).
  """
  manager = ocp.CheckpointManager(
      os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={checkpoint_lib.STATE: ocp.PyTreeCheckpointHandler()})
  target = {name: abstract_variables[name] for name in checkpoint_lib.VARIABLE_COLLECTIONS}
  try:
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{checkpoint_lib.STATE: restore}))
  except (ValueError, KeyError, TypeError) as error:
    raise CheckpointError(
        f"cannot restore the model of {directory}/{step}: {checkpoint_lib.first_line(error)}. "
        "Its variables do not fit this config's model (model.depth, model.width, "
        "model.modality_specific_stem, model.non_local)") from error
  finally:
    manager.close()
  return restored[checkpoint_lib.STATE]
