"""The training loops: teacher (stage 1) and DAKD student (stage 2).

Each stage takes its parts (`stage_parts.TrainingParts`: network, mesh, evaluator, optimiser,
loss settings, views, initial variables, steps per epoch), built once by the caller, and reads
from the config only the loop's own knobs (epochs, evaluation and logging cadence, checkpoints).
Data flows one way: Grain host batches -> global arrays on the mesh -> one compiled step ->
metrics, fetched only at logging intervals -> writers. Both stages share `run_stage`, which owns
resuming, logging, evaluation and checkpoints; the stages differ in their state, their step and
what happens at an epoch's start (the teacher rebuilds its class-centre memories). The data
position is the step: batches are a pure function of (seed, step), so a resumed run restarts
the input pipeline at the restored step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import interrupts
from dakd_jax import progress as progress_lib
from dakd_jax import sharding as sharding_lib
from dakd_jax import stage_parts
from dakd_jax import writers
from dakd_jax.data import pipeline
from dakd_jax.evaluation import evaluator as evaluator_lib
from dakd_jax.evaluation import report
from dakd_jax.train import centres as centres_lib
from dakd_jax.train import finite
from dakd_jax.train import memory_plan
from dakd_jax.train import saving
from dakd_jax.train import state as state_lib
from dakd_jax.train import steps as steps_lib


@dataclasses.dataclass
class Stage:
  """What differs between the teacher and the student loop.

  step_fn: jitted (state, batch) -> (state, metrics), extra arguments already bound.
  on_epoch_start: (state, epoch) -> state, e.g. the teacher's memory rebuild.
  """
  name: str
  epochs: int
  steps_per_epoch: int
  eval_due: Callable[[int], bool]  # epoch (1-based, just finished) -> evaluate now?
  step_fn: Callable
  on_epoch_start: Callable
  # state -> {'params', 'batch_stats'} of the evaluated network.
  variables_of: Callable = lambda state: state.variables
  # state -> None, once the last step is done (also when a finished run is resumed).
  on_finish: Callable | None = None


def jit_step(step_fn: Callable, mesh, num_extra: int = 0) -> Callable:
  """Jits a (state, *extra, batch) step: state and extras replicated, batch on 'data', state
  donated. Shardings are given per argument, so each stage compiles exactly once."""
  replicated = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(replicated,) * (1 + num_extra) + (data,),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def _mean_metrics(history: list[tuple[int, dict]]) -> dict:
  names = history[-1][1].keys()
  return {name: float(np.mean([m[name] for _, m in history])) for name in names}


# <stage workdir>/LAST_EVALUATION: the stage's latest training-time evaluation, every trial.
LAST_EVALUATION = "last_evaluation.json"


def read_last_evaluation(stage_workdir: str) -> dict | None:
  """{'stage', 'step', 'protocol', 'results'} of a stage's latest evaluation, or None if it has
  not evaluated yet."""
  path = os.path.join(stage_workdir, LAST_EVALUATION)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


# What a training-time evaluation is for, by checkpoint.select, as its table's title says.
EVALUATION_ROLES = {"last": "test split, progress only: the last step is kept",
                    "val": "validation identities, selects the checkpoint",
                    "test_oracle": "test split, oracle selection of the checkpoint"}


def evaluation_role(stage: str, selection: str) -> str:
  """What a training-time evaluation's title says it is: the pretrain stage evaluates its own
  held-out synthetic persons (not the experiment's test split); the others per selection."""
  if stage == "pretrain":
    return ("the pretraining set's own held-out persons (pretrain.num_test_ids), not the "
            "experiment's test split")
  return EVALUATION_ROLES[selection]


def evaluate_during_training(evaluator: evaluator_lib.Evaluator, variables, writer,
                             step: int, selection: str) -> dict:
  """Runs the stage's evaluator, logs its headline metrics, prints its table and writes it to
  <stage workdir>/LAST_EVALUATION (process 0).

  The protocols are the training-time subset (SYSU: single-shot of eval.training_modes; RegDB:
  visible->thermal; LLCM: infrared->visible), or the held-out validation identities with
  checkpoint.select=val; the title says which and whether it chooses the checkpoint.
  """
  results = evaluator.run(variables)
  summary = evaluator_lib.headline(results)
  writer.write_scalars(step, {f"eval_{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    title = f"[{writer.stage} step {step}] evaluation ({evaluation_role(writer.stage, selection)})"
    print("\n" + report.format_table(results, title=title), flush=True)
    report.write_results(os.path.join(writer.workdir, LAST_EVALUATION), {
        "stage": writer.stage, "step": step, "protocol": evaluator.settings.describe(),
        "selection": selection, "results": results})
  return summary


def run_stage(stage: Stage, config: ml_collections.ConfigDict, workdir: str,
              parts: stage_parts.TrainingParts, state: Any) -> dict:
  """Trains `stage` from `state` (fresh or resumed inside), evaluates and checkpoints, on the
  data, mesh, evaluator and loader workers of `parts`.

  Returns {'best': metrics of the best evaluation, 'last': metrics of the last, 'steps'}.
  Whatever was opened is closed on the way out, also when a step, a save or a write fails.
  A stop signal (interrupts.Stopped, KeyboardInterrupt) first checkpoints the steps done.
  """
  total_steps = stage.epochs * stage.steps_per_epoch
  data, mesh, evaluator = parts.data, parts.mesh, parts.evaluator
  with contextlib.ExitStack() as cleanup:
    manager = checkpoint_lib.CheckpointManager(
        os.path.join(workdir, "checkpoints"), keep_last=config.checkpoint.keep_last,
        keep_best=config.checkpoint.keep_best)
    cleanup.callback(manager.close)
    state, metadata = _maybe_resume(config, workdir, manager, state, mesh)
    start_step = int(jax.device_get(state.step))
    if jax.process_index() == 0:
      writers.drop_rows_after(os.path.join(workdir, writers.JSONL_NAME), start_step)
      _drop_later_evaluation(workdir, start_step)
    writer = writers.MetricWriter(workdir, stage=stage.name)
    cleanup.callback(writer.close)
    iterator = pipeline.make_train_iterator(
        data.train_source, data.train_meta, seed=config.seed,
        ids_per_batch=config.data.ids_per_batch, images_per_id=config.data.images_per_id,
        start_step=start_step, num_steps=total_steps, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=parts.num_workers)
    if hasattr(iterator, "close"):  # Stops Grain worker processes.
      cleanup.callback(iterator.close)
    # Plain lines only (a log file): fills silences longer than the progress pace.
    heartbeat = progress_lib.Heartbeat(
        stage.name, enabled=config.log.progress and jax.process_index() == 0)
    cleanup.callback(heartbeat.close)
    progress = writers.ProgressLine(total_steps, stage=stage.name,
                                    steps_per_epoch=stage.steps_per_epoch, start_step=start_step,
                                    use_tty=None if config.log.progress else False,
                                    on_line=heartbeat.touch)
    cleanup.callback(progress.close)
    out = saving.Outputs(manager, writer, progress, heartbeat)
    best = dict(metadata.get("best", {})) if metadata else {}
    position = saving.Position(start_step, state, best)
    try:
      if metadata and metadata.get("evaluation_due"):  # Stopped during this step's evaluation.
        _evaluate_step(stage, config, evaluator, out, position)
      _train_steps(stage, config, iterator, mesh, evaluator, out, position, data.fingerprint)
    except (interrupts.Stopped, KeyboardInterrupt) as stop:
      saving.save_on_stop(stage, config, out, position, data.fingerprint, stop)
      raise
  return {"best": position.best, "last": position.last_eval, "steps": total_steps}


def _evaluate_step(stage: Stage, config: ml_collections.ConfigDict,
                   evaluator: evaluator_lib.Evaluator, out: saving.Outputs,
                   position: saving.Position) -> dict | None:
  """The training-time evaluation of `position.step`; updates last_eval and (unless
  checkpoint.select is "last", where evaluations only show progress) best. Returns the metrics
  that rank the step's checkpoint, or None."""
  out.progress.clear()
  out.heartbeat.step(None)  # The evaluation prints its own progress and table.
  position.evaluation_due = True
  position.last_eval = evaluate_during_training(
      evaluator, stage.variables_of(position.state), out.writer, position.step,
      config.checkpoint.select)
  position.evaluation_due = False
  if config.checkpoint.select == "last":
    return None
  if not position.best or position.last_eval["mAP"] > position.best["mAP"]:
    position.best = dict(position.last_eval, step=position.step)
  return {"mAP": position.last_eval["mAP"]}


def _train_steps(stage: Stage, config: ml_collections.ConfigDict, iterator, mesh,
                 evaluator: evaluator_lib.Evaluator, out: saving.Outputs, position: saving.Position,
                 data_fingerprint: str) -> None:
  """The steps from `position.step` to the stage's end, keeping `position` up to date.

  Evaluations rank checkpoints (and update `best`) unless checkpoint.select is "last", where
  they only show progress; every checkpoint records the selection rule and the data's
  fingerprint. Each step and each save runs in `interrupts.deferred()`: a stop signal ends
  the run between them, never inside."""
  total_steps = stage.epochs * stage.steps_per_epoch
  start_step, data_time = position.step, 0.0
  shown_step = start_step  # The step of the progress line's latest update.
  deferred = None  # A checkpoint held back until the next step's loss is checked.
  images_per_step = 2 * config.data.ids_per_batch * config.data.images_per_id
  phase_seconds = {"epoch_start": 0.0, "evaluation": 0.0}  # The latest of each, for the ETA.
  for step in range(start_step, total_steps):
    if step % stage.steps_per_epoch == 0:
      out.progress.clear()  # The memory rebuild may draw its own bars.
      out.heartbeat.step(None)  # ... and print its own lines.
      started = time.perf_counter()
      position.state = stage.on_epoch_start(position.state, step // stage.steps_per_epoch)
      phase_seconds["epoch_start"] = time.perf_counter() - started
    done = step + 1
    out.heartbeat.step(f"step {done}/{total_steps} running"
                       + (" (compiling first)" if step == start_step else ""))
    with interrupts.deferred():
      started = time.perf_counter()
      host_batch = next(iterator)
      data_time += time.perf_counter() - started
      batch = sharding_lib.host_to_global(
          {k: host_batch[k] for k in ("visible", "infrared", "labels")}, mesh)
      position.state, metrics = stage.step_fn(position.state, batch)
      position.step = done
      if step == start_step:  # Compiled now: rates and the ETA count from here.
        out.progress.restart_clock(start_step)
        data_time = 0.0
      position.pending.append((done, metrics))
      if deferred is not None:  # Saved once this step's loss, computed from it, is finite.
        deferred = saving.save_when_followed_by_a_finite_loss(
            deferred, position.pending, stage.name, out.manager)
      log_due = done % config.log.every_steps == 0 or done % stage.steps_per_epoch == 0 \
          or done == total_steps
      if log_due or out.progress.is_due():
        history = saving.fetch(position.pending)
        finite.check_finite_losses(history, stage.name, out.manager)
        means = _mean_metrics(history)
        out.progress.update(done, means, images_per_step * (done - shown_step),
                            data_time=data_time,
                            other_seconds_left=_other_seconds_left(stage, done, phase_seconds))
        shown_step, data_time = done, 0.0
        if log_due:
          out.writer.write_scalars(done, means)
          position.pending = []
    eval_metrics, evaluated = None, False
    if done % stage.steps_per_epoch == 0 and (
        stage.eval_due(done // stage.steps_per_epoch) or done == total_steps):
      evaluated, started = True, time.perf_counter()
      eval_metrics = _evaluate_step(stage, config, evaluator, out, position)
      phase_seconds["evaluation"] = time.perf_counter() - started
    if evaluated or done % config.checkpoint.every_steps == 0 or done == total_steps:
      with interrupts.deferred():
        saving.fetch_checked(position, stage.name, out.manager)
        finite.check_finite_state(position.state, done, stage.name, out.manager)
        metadata = saving.checkpoint_metadata(stage, config, done, position.best,
                                              data_fingerprint)
        if done == total_steps:
          out.manager.save(done, position.state, metadata, metrics=eval_metrics)
        else:  # A copy: the next step consumes (donates) the state.
          deferred = (done, jax.tree.map(jnp.copy, position.state), metadata, eval_metrics)
  if stage.on_finish is not None:
    stage.on_finish(position.state)


def _other_seconds_left(stage: Stage, done: int, phase_seconds: dict) -> float:
  """The time a stage needs after `done` steps besides the steps: the epoch starts (the
  teacher's memory rebuild) and the evaluations still to come, each at its latest duration
  (an evaluation not run yet counts 0)."""
  per_epoch = stage.steps_per_epoch
  starts_left = sum(1 for epoch in range(stage.epochs) if epoch * per_epoch >= done)
  evaluations_left = sum(1 for epoch in range(1, stage.epochs + 1) if epoch * per_epoch >= done
                         and (stage.eval_due(epoch) or epoch == stage.epochs))
  return (starts_left * phase_seconds["epoch_start"]
          + evaluations_left * phase_seconds["evaluation"])


def _drop_later_evaluation(workdir: str, start_step: int) -> None:
  """Removes a LAST_EVALUATION written after `start_step` (a run restarted from an earlier
  checkpoint, or from scratch), so it never describes a network this run did not reach."""
  last = read_last_evaluation(workdir)
  if last is not None and last["step"] > start_step:
    os.remove(os.path.join(workdir, LAST_EVALUATION))


def _maybe_resume(config, workdir, manager, state, mesh):
  """Restores state and metadata in the resume order of checkpoint.py."""
  found = checkpoint_lib.find_resume_checkpoint(os.path.join(workdir, "checkpoints"),
                                                config.checkpoint.resume)
  if found is None:
    return state, None
  directory, step = found
  target = state_lib.abstract_state(state, sharding_lib.replicated(mesh))
  source = manager if os.path.abspath(directory) == os.path.abspath(manager.directory) else \
      checkpoint_lib.CheckpointManager(directory, read_only=True)
  restored, metadata = source.restore(
      step, target, config=config.to_dict(),
      allow_config_change=config.checkpoint.allow_config_change)
  if jax.process_index() == 0:
    print(f"dakd_jax: resumed from {directory} step {step}")
  return restored, metadata


def train_teacher(config: ml_collections.ConfigDict, workdir: str,
                  parts: stage_parts.TrainingParts) -> dict:
  """Stage 1 (method.md 3): memory-based teacher, from `parts` (`stage_parts`). Returns
  run_stage's summary."""
  model, data, mesh = parts.model, parts.data, parts.mesh
  state = state_lib.create_replicated_state(
      parts.variables, parts.optimizer, parts.state_key, mesh,
      centres_lib.zero_memories(data.num_classes, parts.features))
  step = steps_lib.make_teacher_step(
      model, parts.optimizer, parts.losses, parts.views,
      hard_momentum=config.teacher.hard_momentum, mean_momentum=config.teacher.mean_momentum)
  compiled = jit_step(step, mesh)
  memory_plan.check_step_memory(
      compiled, (state, memory_plan.abstract_batch(config, sharding_lib.data_sharding(mesh))),
      "teacher", config)

  def on_epoch_start(state, epoch):
    memories = centres_lib.build_teacher_memories(
        model, state.variables, data, mesh, jax.random.fold_in(parts.memory_key, epoch),
        batch_size=config.eval.batch_size, show_progress=config.log.progress)
    return state.replace(memories=memories)

  first_eval = config.teacher.eval_start_epoch
  stage = Stage(
      name="teacher", epochs=config.teacher.epochs, steps_per_epoch=parts.steps_per_epoch,
      eval_due=lambda e: e > first_eval and e % config.teacher.eval_every_epochs == 0,
      step_fn=compiled, on_epoch_start=on_epoch_start)
  return run_stage(stage, config, workdir, parts, state)


def frozen_teacher(config: ml_collections.ConfigDict,
                   parts: stage_parts.TrainingParts) -> steps_lib.FrozenTeacher:
  """The frozen teacher of the student stage: the teacher variables of `parts` and its centres
  computed on the training set (method.md 4.1)."""
  data = parts.data
  teacher = centres_lib.frozen_teacher(parts.model, parts.teacher_variables, data, parts.mesh,
                                       batch_size=config.eval.batch_size,
                                       show_progress=config.log.progress)
  if jax.process_index() == 0:
    described = parts.teacher_source
    chosen = f", {described['selection_label']}" if "selection_label" in described else ""
    print(f"dakd_jax: teacher from {described['source']}{chosen} ({data.num_classes} centres "
          f"of dim {parts.features})")
  return teacher


def abstract_frozen_teacher(variables: dict, num_classes: int, features: int,
                            mesh) -> steps_lib.FrozenTeacher:
  """The frozen teacher's shapes before its centres exist: its variables and two [classes, D]
  centre tables, replicated as `frozen_teacher` gives them, so that the student's first step
  reuses the memory plan's compile instead of tracing and compiling the step again."""
  replicated = sharding_lib.replicated(mesh)
  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  centres = abstract((num_classes, features), jnp.float32)
  return steps_lib.FrozenTeacher(
      jax.tree.map(lambda x: abstract(np.shape(x), x.dtype), variables), centres, centres)


def train_student(config: ml_collections.ConfigDict, workdir: str,
                  parts: stage_parts.TrainingParts) -> dict:
  """Stage 2 (method.md 4): DAKD self-distillation from the frozen teacher of `parts`."""
  mesh = parts.mesh
  state = state_lib.create_replicated_state(parts.variables, parts.optimizer, parts.state_key,
                                            mesh)
  step = steps_lib.make_student_step(
      parts.model, parts.optimizer, parts.losses, parts.views,
      double_bn_update=config.distill.double_bn_update,
      student_forward=config.distill.student_forward)
  compiled = jit_step(step, mesh, num_extra=1)
  # Sized before the teacher's centres' pass over the training set.
  batch = memory_plan.abstract_batch(config, sharding_lib.data_sharding(mesh))
  planned = abstract_frozen_teacher(parts.teacher_variables, parts.data.num_classes,
                                    parts.features, mesh)
  memory_plan.check_step_memory(compiled, (state, planned, batch), "student", config)
  teacher = frozen_teacher(config, parts)
  stage = Stage(
      name="student", epochs=config.distill.epochs, steps_per_epoch=parts.steps_per_epoch,
      eval_due=lambda e: e % config.distill.eval_every_epochs == 0,
      step_fn=lambda s, batch: compiled(s, teacher, batch), on_epoch_start=lambda s, e: s)
  return run_stage(stage, config, workdir, parts, state)
