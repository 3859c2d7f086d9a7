"""The training loops: teacher (stage 1) and DAKD student (stage 2).

Data flows one way: Grain host batches -> global arrays on the mesh -> one compiled step ->
metrics, fetched only at logging intervals -> writers. Both stages share `run_stage`, which owns
resuming, logging, evaluation and checkpoints; the stages differ in their state, their step and
what happens at an epoch's start (the teacher rebuilds its class-centre memories).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dakd_jax import builders
from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import config as config_lib
from dakd_jax import sharding as sharding_lib
from dakd_jax import writers
from dakd_jax.data import pipeline
from dakd_jax.data import prepare
from dakd_jax.data import sampler
from dakd_jax.evaluation import evaluate
from dakd_jax.train import centres as centres_lib
from dakd_jax.train import state as state_lib
from dakd_jax.train import steps as steps_lib


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite; the message names the step and the terms."""


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
  variables_of: Callable  # state -> {'params', 'batch_stats'} for evaluation
  # state -> None, once the last step is done (also when a finished run is resumed).
  on_finish: Callable | None = None


def stage_steps_per_epoch(config_value: int, config: ml_collections.ConfigDict,
                          data: prepare.DataBundle) -> int:
  """config_value if set, else the sampler's epoch length (method.md 5.1)."""
  if config_value:
    return config_value
  return sampler.steps_per_epoch(
      len(prepare.modality_rows(data.train_meta, 0)),
      len(prepare.modality_rows(data.train_meta, 1)),
      config.data.ids_per_batch, config.data.images_per_id)


def jit_step(step_fn: Callable, mesh, num_extra: int = 0) -> Callable:
  """Jits a (state, *extra, batch) step: state and extras replicated, batch on 'data', state
  donated. Shardings are given per argument, so each stage compiles exactly once."""
  replicated = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(replicated,) * (1 + num_extra) + (data,),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def _check_finite(history: list[tuple[int, dict]], stage: str) -> None:
  for step, metrics in history:
    bad = sorted(name for name, value in metrics.items() if not np.isfinite(value))
    if bad:
      raise NonFiniteLossError(
          f"{stage}: non-finite loss at step {step} in term(s) {bad} "
          f"({', '.join(f'{n}={metrics[n]}' for n in bad)}); the last checkpoint before it is "
          "kept. Lower the learning rate or check the data.")


def _fetch(pending: list[tuple[int, Any]]) -> list[tuple[int, dict]]:
  values = jax.device_get([m for _, m in pending])
  return [(step, {k: float(v) for k, v in m.items()}) for (step, _), m in zip(pending, values)]


def _mean_metrics(history: list[tuple[int, dict]]) -> dict:
  names = history[-1][1].keys()
  return {name: float(np.mean([m[name] for _, m in history])) for name in names}


def run_stage(stage: Stage, config: ml_collections.ConfigDict, workdir: str,
              data: prepare.DataBundle, state: Any, mesh) -> dict:
  """Trains `stage` from `state` (fresh or resumed inside), evaluates and checkpoints.

  Returns {'best': metrics of the best evaluation, 'last': metrics of the last, 'steps'}.
  """
  total_steps = stage.epochs * stage.steps_per_epoch
  manager = checkpoint_lib.CheckpointManager(
      os.path.join(workdir, "checkpoints"), keep_last=config.checkpoint.keep_last,
      keep_best=config.checkpoint.keep_best)
  state, data_state, metadata = _maybe_resume(config, workdir, manager, state, mesh)
  start_step = int(jax.device_get(state.step))
  iterator = pipeline.make_train_iterator(
      data.train_source, data.train_meta, seed=config.seed,
      ids_per_batch=config.data.ids_per_batch, images_per_id=config.data.images_per_id,
      start_step=0, num_steps=total_steps, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.data.num_workers)
  if data_state is not None:
    iterator.set_state(data_state)
  writer = writers.MetricWriter(workdir, stage=stage.name)
  progress = writers.ProgressLine(total_steps, stage=stage.name,
                                  steps_per_epoch=stage.steps_per_epoch, start_step=start_step,
                                  use_tty=None if config.log.progress else False)
  best = dict(metadata.get("best", {})) if metadata else {}
  last_eval, pending, data_time = {}, [], 0.0
  images_per_step = 2 * config.data.ids_per_batch * config.data.images_per_id
  try:
    for step in range(start_step, total_steps):
      epoch = step // stage.steps_per_epoch
      if step % stage.steps_per_epoch == 0:
        state = stage.on_epoch_start(state, epoch)
      started = time.perf_counter()
      host_batch = next(iterator)
      data_time += time.perf_counter() - started
      if int(host_batch["step"]) != step:
        raise RuntimeError(f"data iterator is at step {int(host_batch['step'])}, training at "
                           f"{step}: the checkpoint's data state does not match its train state")
      batch = sharding_lib.host_to_global(
          {k: host_batch[k] for k in ("visible", "infrared", "labels")}, mesh)
      state, metrics = stage.step_fn(state, batch)
      pending.append((step + 1, metrics))
      done = step + 1
      epoch_end = done % stage.steps_per_epoch == 0
      if done % config.log.every_steps == 0 or epoch_end or done == total_steps:
        history = _fetch(pending)
        pending = []
        _check_finite(history, stage.name)
        means = _mean_metrics(history)
        writer.write_scalars(done, means)
        progress.update(done, means, images_per_step * len(history), data_time=data_time)
        data_time = 0.0
      eval_metrics = None
      if epoch_end and (stage.eval_due(done // stage.steps_per_epoch) or done == total_steps):
        last_eval = evaluate.evaluate_during_training(config, data, stage.variables_of(state),
                                                      mesh, writer, done)
        eval_metrics = {"mAP": last_eval["mAP"]}
        if not best or last_eval["mAP"] > best["mAP"]:
          best = dict(last_eval, step=done)
      if eval_metrics is not None or done % config.checkpoint.every_steps == 0 \
          or done == total_steps:
        if pending:  # Never checkpoint a state whose losses were not checked.
          history = _fetch(pending)
          pending = []
          _check_finite(history, stage.name)
        manager.save(done, state, iterator.get_state(),
                     {"config": config_lib.to_dict(config), "epoch": epoch + 1,
                      "stage": stage.name, "best": best}, metrics=eval_metrics)
    if stage.on_finish is not None:
      stage.on_finish(state)
  finally:
    progress.close()
    if hasattr(iterator, "close"):  # Stops Grain worker processes.
      iterator.close()
    manager.close()
    writer.close()
  return {"best": best, "last": last_eval, "steps": total_steps}


def _maybe_resume(config, workdir, manager, state, mesh):
  """Restores state, data iterator state and metadata in the resume order of checkpoint.py."""
  found = checkpoint_lib.find_resume_checkpoint(os.path.join(workdir, "checkpoints"),
                                                config.checkpoint.resume)
  if found is None:
    return state, None, None
  directory, step = found
  target = state_lib.abstract_state(state, sharding_lib.replicated(mesh))
  source = manager if os.path.abspath(directory) == os.path.abspath(manager.directory) else \
      checkpoint_lib.CheckpointManager(directory, read_only=True)
  restored, data_state, metadata = source.restore(
      step, target, config=config_lib.to_dict(config),
      allow_config_change=config.checkpoint.allow_config_change)
  if jax.process_index() == 0:
    print(f"dakd_jax: resumed from {directory} step {step}")
  return restored, data_state, metadata


def train_teacher(config: ml_collections.ConfigDict, workdir: str,
                  data: prepare.DataBundle) -> dict:
  """Stage 1 (method.md 3): memory-based teacher. Returns run_stage's summary."""
  mesh = sharding_lib.make_mesh()
  model = builders.model_from_config(config)
  steps_per_epoch = stage_steps_per_epoch(config.teacher.steps_per_epoch, config, data)
  tx = state_lib.make_teacher_optimizer(config, steps_per_epoch)
  key_init, key_state, key_memory = jax.random.split(jax.random.key(config.seed), 3)
  state = centres_lib.create_teacher_state(config, model, tx, data.num_classes, key_init,
                                           key_state, mesh)
  step = steps_lib.make_teacher_step(
      model, tx, builders.teacher_settings(config), builders.augment_views(config, "teacher"),
      hard_momentum=config.teacher.hard_momentum, mean_momentum=config.teacher.mean_momentum)
  compiled = jit_step(step, mesh)

  def on_epoch_start(state, epoch):
    memories = centres_lib.build_teacher_memories(
        config, model, {"params": state.params, "batch_stats": state.batch_stats}, data, mesh,
        jax.random.fold_in(key_memory, epoch))
    return state.replace(memories=memories)

  first_eval = config.teacher.eval_start_epoch
  stage = Stage(
      name="teacher", epochs=config.teacher.epochs, steps_per_epoch=steps_per_epoch,
      eval_due=lambda e: e > first_eval and e % config.teacher.eval_every_epochs == 0,
      step_fn=compiled, on_epoch_start=on_epoch_start,
      variables_of=lambda s: {"params": s.params, "batch_stats": s.batch_stats})
  return run_stage(stage, config, workdir, data, state, mesh)


def train_student(config: ml_collections.ConfigDict, workdir: str, data: prepare.DataBundle,
                  teacher_source: str) -> dict:
  """Stage 2 (method.md 4): DAKD self-distillation from a frozen teacher."""
  mesh = sharding_lib.make_mesh()
  model = builders.model_from_config(config)
  teacher = centres_lib.load_frozen_teacher(config, model, data, teacher_source, mesh)
  steps_per_epoch = stage_steps_per_epoch(config.distill.steps_per_epoch, config, data)
  tx = state_lib.make_student_optimizer(config)
  # The student starts from ImageNet (or random) weights, not from the teacher (method.md 2.4).
  key_init, key_state = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
  variables = builders.init_model_variables(config, model, key_init)
  state = state_lib.create_replicated_state(variables, tx, key_state, mesh)
  step = steps_lib.make_student_step(
      model, tx, builders.distill_settings(config), builders.augment_views(config, "student"),
      double_bn_update=config.distill.double_bn_update)
  compiled = jit_step(step, mesh, num_extra=1)
  stage = Stage(
      name="student", epochs=config.distill.epochs, steps_per_epoch=steps_per_epoch,
      eval_due=lambda e: e % config.distill.eval_every_epochs == 0,
      step_fn=lambda s, batch: compiled(s, teacher, batch), on_epoch_start=lambda s, e: s,
      variables_of=lambda s: {"params": s.params, "batch_stats": s.batch_stats})
  return run_stage(stage, config, workdir, data, state, mesh)
