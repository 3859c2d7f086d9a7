"""What a running stage saves, and when: checkpoints held back until the next step proved them
finite (`save_when_followed_by_a_finite_loss`), the metadata every checkpoint records, and the
checkpoint a stop signal leaves (`save_on_stop`). `Position` is how far a stage has come, kept
up to date by the loop (`loop._train_steps`) so that a stop can checkpoint it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import interrupts
from dakd_jax import progress as progress_lib
from dakd_jax import writers
from dakd_jax.train import finite


def save_when_followed_by_a_finite_loss(deferred: tuple, pending: list, stage: str,
                                        manager: checkpoint_lib.CheckpointManager) -> None:
  """Saves a checkpoint held back one step (step, state, metadata, metrics) once the step after
  it, the last of `pending`, computed a finite loss from it; raises NonFiniteLossError
  (`finite.check_finite_losses`, naming the checkpoint before it) when not. A finite but
  exploded state (the update of a far too large learning rate) is caught here, before it is
  saved, not when a resume diverges again. Returns None: nothing is held back any more."""
  if not np.isfinite(float(jax.device_get(pending[-1][1]["loss"]))):
    finite.check_finite_losses(fetch(pending), stage, manager)
  step, state, metadata, metrics = deferred
  manager.save(step, state, metadata, metrics=metrics)
  return None


def fetch(pending: list[tuple[int, Any]]) -> list[tuple[int, dict]]:
  """(step, {name: float}) of (step, device metrics) pairs, fetched in one transfer."""
  values = jax.device_get([m for _, m in pending])
  return [(step, {k: float(v) for k, v in m.items()}) for (step, _), m in zip(pending, values)]


@dataclasses.dataclass
class Outputs:
  """Where a running stage's results go: checkpoints, metrics, the progress line, and the
  heartbeat that fills a log's silences longer than the progress pace (a slow first compile,
  steps of minutes on a CPU)."""
  manager: checkpoint_lib.CheckpointManager
  writer: writers.MetricWriter
  progress: writers.ProgressLine
  heartbeat: progress_lib.Heartbeat


@dataclasses.dataclass
class Position:
  """How far a running stage has come, kept up to date by the loop so that a stop signal can
  checkpoint it (`save_on_stop`).

  step: the steps done; state: the state after them (consistent: every step's work is done);
  pending: (step, metrics) not yet fetched and checked; best, last_eval: as `_train_steps`
  returns them; evaluation_due: the evaluation of `step` started and has not finished.
  """
  step: int
  state: Any
  best: dict
  last_eval: dict = dataclasses.field(default_factory=dict)
  pending: list = dataclasses.field(default_factory=list)
  evaluation_due: bool = False


def checkpoint_metadata(stage, config: ml_collections.ConfigDict, done: int,
                        best: dict, data_fingerprint: str) -> dict:
  """What every checkpoint of `stage` (the loop's Stage) records beside its state."""
  return {"config": config.to_dict(), "epoch": -(-done // stage.steps_per_epoch),
          "stage": stage.name, "best": best, "selection": config.checkpoint.select,
          "data_fingerprint": data_fingerprint}


def fetch_checked(position: Position, stage_name: str,
                  manager: checkpoint_lib.CheckpointManager) -> None:
  """Fetches and checks the losses not yet checked (never checkpoint a state whose losses were
  not checked)."""
  if position.pending:
    history = fetch(position.pending)
    position.pending = []
    finite.check_finite_losses(history, stage_name, manager)


def save_on_stop(stage, config: ml_collections.ConfigDict, out: Outputs,
                 position: Position, data_fingerprint: str, stop: BaseException) -> None:
  """On a stop signal: checkpoints the steps done unless the newest checkpoint holds them and
  waits for the saves; records on `stop` (when it is interrupts.Stopped) what was saved.

  A step stopped during its evaluation is saved marked "evaluation_due" (the resumed run
  evaluates it first) when evaluations only show progress (checkpoint.select=last); when they
  rank checkpoints the step is not saved, as its checkpoint needs the evaluation's metrics.
  A state whose buffers were donated to a step cut in the middle (Ctrl-C without the handlers
  of interrupts.handle_stop_signals) cannot be saved either.
  """
  with interrupts.ignored():
    out.progress.clear()
    latest = out.manager.latest_step()
    savable = not any(isinstance(leaf, jax.Array) and leaf.is_deleted()
                      for leaf in jax.tree.leaves(position.state))
    ranked_evaluation = position.evaluation_due and config.checkpoint.select != "last"
    if savable and not ranked_evaluation and (latest is None or latest < position.step):
      fetch_checked(position, stage.name, out.manager)
      finite.check_finite_state(position.state, position.step, stage.name, out.manager)
      metadata = checkpoint_metadata(stage, config, position.step, position.best,
                                     data_fingerprint)
      metadata["evaluation_due"] = position.evaluation_due
      out.manager.save(position.step, position.state, metadata)
    out.manager.wait()
    latest = out.manager.latest_step()
    if isinstance(stop, interrupts.Stopped) and latest is not None:
      stop.saved = f"{stage.name} step {latest} saved in {out.manager.directory}"
