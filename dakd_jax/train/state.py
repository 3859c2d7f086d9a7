"""The training state pytree, the optimisers and schedules, and its sharded creation.

One `TrainState` per stage holds everything a step changes: parameters, BN statistics, optimiser
state, the teacher's class-centre memories (None for the student), the step and the base key.
The frozen teacher of the student stage is never in here (it is an argument of the step), so
it is never in the student's optimiser or checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes. All fields are arrays (or None)."""
  step: jax.Array  # int32 scalar: optimisation steps done
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array  # base PRNG key; each step uses fold_in(key, step)
  memories: Any = None  # losses.memory.CentreMemories for the teacher, None for the student


def teacher_learning_rate(config: ml_collections.ConfigDict,
                          steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """The MCE per-epoch schedule (method.md 3.4) as a function of the step.

  lr(e) = base (e+1)/warmup for e < warmup; base for e <= D1; 0.1 base for D1 < e < D2;
  0.01 base for e >= D2; e = step // steps_per_epoch (note the strict > at D1).
  """
  base = config.teacher.lr
  warmup = config.teacher.warmup_epochs
  first_decay, second_decay = config.teacher.decay_epochs

  def schedule(step):
    epoch = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    lr = jnp.where(epoch > first_decay, 0.1 * base, base)
    lr = jnp.where(epoch >= second_decay, 0.01 * base, lr)
    if warmup > 0:
      lr = jnp.where(epoch < warmup, base * (epoch + 1) / warmup, lr)
    return lr

  return schedule


def make_teacher_optimizer(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (added to the gradient before Adam, as torch's Adam)."""
  schedule = teacher_learning_rate(config, steps_per_epoch)
  return optax.chain(
      optax.add_decayed_weights(config.teacher.weight_decay),
      optax.scale_by_adam(b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps),
      optax.scale_by_learning_rate(schedule),
  )


def make_student_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam, constant learning rate, no weight decay (method.md 4.7)."""
  return optax.adam(config.distill.lr, b1=config.optim.b1, b2=config.optim.b2,
                    eps=config.optim.eps)


def create_state(variables: dict, tx: optax.GradientTransformation, key: jax.Array,
                 memories: Any = None) -> TrainState:
  """A fresh state from model variables ({'params', 'batch_stats'})."""
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    key=key, memories=memories)


def create_replicated_state(variables: dict, tx: optax.GradientTransformation, key: jax.Array,
                            mesh, memories: Any = None) -> TrainState:
  """A fresh state with every leaf replicated on `mesh` (parameters are not sharded).

  The variables are placed first; the optimiser state is then created by a jit whose
  out_shardings place it, so nothing is built on one device and copied afterwards.
  """
  from dakd_jax import sharding as sharding_lib  # Avoids an import cycle at module load.
  replicated = sharding_lib.replicated(mesh)
  variables, key, memories = sharding_lib.replicate((variables, key, memories), mesh)
  return jax.jit(lambda v, k, m: create_state(v, tx, k, m), out_shardings=replicated)(
      variables, key, memories)


def abstract_state(state_or_fn, sharding) -> Any:
  """ShapeDtypeStructs carrying `sharding`, the target for restoring a checkpoint."""
  shapes = jax.eval_shape(state_or_fn) if callable(state_or_fn) else state_or_fn
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
