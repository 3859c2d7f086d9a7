"""Divergence, found before it is saved: non-finite losses and weights, and what is left.

The training loop (`loop.py`) checks every fetched loss (`check_finite_losses`) and the state's
weights before each checkpoint (`check_finite_state`); messages name the last checkpoint kept,
or say there is none (`last_finite_checkpoint`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax.errors import NonFiniteLossError


def last_finite_checkpoint(manager: checkpoint_lib.CheckpointManager) -> str:
  """What a divergence leaves to resume from, as a clause: the newest saved checkpoint (a
  checkpoint is saved only once the next step computed a finite loss from it, or, the last
  step's, once its weights are checked finite), or that there is none."""
  manager.wait()  # A save still in flight counts once committed.
  steps = manager.all_steps()
  if not steps:
    return "no checkpoint was saved before it, so there is none to resume from"
  return (f"the last checkpoint, step {steps[-1]} in {manager.directory}, is finite and kept "
          "(resume from it with --config.checkpoint.allow_config_change=True)")


def check_finite_losses(history: list[tuple[int, dict]], stage: str,
                        manager: checkpoint_lib.CheckpointManager) -> None:
  """Raises NonFiniteLossError at the first (step, {term: value}) of `history` holding NaN or
  infinity, naming the step, the terms and the last checkpoint kept."""
  for step, metrics in history:
    bad = sorted(name for name, value in metrics.items() if not np.isfinite(value))
    if bad:
      raise NonFiniteLossError(
          f"{stage}: non-finite loss at step {step} in term(s) {bad} "
          f"({', '.join(f'{n}={metrics[n]}' for n in bad)}); "
          f"{last_finite_checkpoint(manager)}. Lower the learning rate or check the data.")


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every floating-point value of a pytree is finite (one device reduction)."""
  leaves = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def check_finite_state(state: Any, step: int, stage: str,
                       manager: checkpoint_lib.CheckpointManager) -> None:
  """Refuses to checkpoint a state holding NaN or infinity: the step's loss was finite but its
  update was not (a learning rate far too large); a saved checkpoint is always finite."""
  if not bool(jax.device_get(all_finite(state))):
    raise NonFiniteLossError(
        f"{stage}: the weights became non-finite at step {step} (its loss was finite, the "
        f"update was not) and are not saved; {last_finite_checkpoint(manager)}. Lower the "
        "learning rate.")
