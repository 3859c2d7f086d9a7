"""The training state pytree, its one update tail, and its sharded creation.

One `TrainState` per stage holds everything a step changes: parameters, BN statistics, optimiser
state, the teacher's class-centre memories (None for the student), the step and the base key.
The frozen teacher of the student stage is never in here (it is an argument of the step), so
it is never in the student's optimiser or checkpoint. The optimisers themselves are built from
the config by `dakd_jax.builders`.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dakd_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes. All fields are arrays (or None)."""
  step: jax.Array  # int32 scalar: optimisation steps done (also the data position)
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array  # base PRNG key; each step uses fold_in(key, step)
  memories: Any = None  # losses.memory.CentreMemories for the teacher, None for the student

  def apply_gradients(self, tx: optax.GradientTransformation, grads: Any,
                      **changes) -> "TrainState":
    """The update tail of every step: optimiser update of the parameters, step + 1, and the
    other fields a step changes (`batch_stats=...`, `memories=...`)."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)

  @property
  def variables(self) -> dict:
    """The model variables {'params', 'batch_stats'} (for evaluation and export)."""
    return {"params": self.params, "batch_stats": self.batch_stats}


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
  replicated = sharding_lib.replicated(mesh)
  variables, key, memories = sharding_lib.replicate((variables, key, memories), mesh)
  return jax.jit(lambda v, k, m: create_state(v, tx, k, m), out_shardings=replicated)(
      variables, key, memories)


def abstract_state(state_or_fn, sharding) -> Any:
  """ShapeDtypeStructs carrying `sharding`, the target for restoring a checkpoint."""
  shapes = jax.eval_shape(state_or_fn) if callable(state_or_fn) else state_or_fn
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
