"""Pure training and inference steps: augment on device, forward, loss, update.

Each factory closes over the static parts (model, optimiser, loss settings, augmentation
settings) and returns a function of arrays only, which the loop jits once with explicit
shardings and a donated state. A step's randomness is `fold_in(state.key, state.step)` split per
purpose, so a resumed run draws exactly the numbers an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from dakd_jax import augment
from dakd_jax.losses import alignment
from dakd_jax.losses import distill
from dakd_jax.losses import memory as memory_lib
from dakd_jax.modalities import INFRARED_CODE, VISIBLE_CODE
from dakd_jax.train.state import TrainState


@flax.struct.dataclass
class FrozenTeacher:
  """The student stage's teacher: inference-mode variables and its fixed class centres."""
  variables: Any  # {'params', 'batch_stats'}
  centres_visible: jax.Array  # [C, D] unit rows (method.md 4.1)
  centres_infrared: jax.Array  # [C, D]


def modality_codes(n: int, code: int) -> jax.Array:
  """int32 [n] filled with a modality code (the stem routing of n images of one modality)."""
  return jnp.full((n,), code, jnp.int32)


def make_teacher_step(model, tx: optax.GradientTransformation,
                      settings: alignment.TeacherSettings, views: dict,
                      *, hard_momentum: float, mean_momentum: float) -> Callable:
  """Returns teacher_step(state, batch) -> (state, metrics) (method.md 3.1-3.3).

  batch: {'visible': uint8 [n,H,W,3], 'infrared': uint8 [n,H,W,3], 'labels': int32 [n]}.
  views: AugmentSettings for 'visible', 'infrared' and 'channel' (the three teacher views).
  The three views go through the network in ONE batch [v; i; a] so BN statistics cover all
  3n images; the channel view is a visible image and takes the visible stem.
  """

  def teacher_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(state.key, state.step)
    key_v, key_i, key_a = jax.random.split(key, 3)
    n = batch["labels"].shape[0]
    images = jnp.concatenate([
        augment.augment_batch(key_v, batch["visible"], views["visible"]),
        augment.augment_batch(key_i, batch["infrared"], views["infrared"]),
        augment.augment_batch(key_a, batch["visible"], views["channel"]),
    ])
    modality = jnp.concatenate([modality_codes(n, VISIBLE_CODE), modality_codes(n, INFRARED_CODE),
                                modality_codes(n, VISIBLE_CODE)])
    labels = batch["labels"]

    def loss_fn(params):
      outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                     images, modality, train=True, mutable=["batch_stats"])
      g = outputs["features"]
      loss, terms = alignment.teacher_loss(g[:n], g[n:2 * n], g[2 * n:], labels, state.memories,
                                           settings)
      return loss, (terms, updates["batch_stats"], g)

    (loss, (terms, batch_stats, g)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    # Memories move with this step's embeddings, computed before the parameter update.
    z = memory_lib.unit_rows(jax.lax.stop_gradient(g))
    memories = memory_lib.update_memories(state.memories, z[:n], z[n:2 * n], z[2 * n:], labels,
                                          hard_momentum=hard_momentum,
                                          mean_momentum=mean_momentum)
    new_state = state.apply_gradients(tx, grads, batch_stats=batch_stats, memories=memories)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return teacher_step


def make_student_step(model, tx: optax.GradientTransformation,
                      settings: distill.DistillSettings, views: dict,
                      *, double_bn_update: bool = False) -> Callable:
  """Returns student_step(state, teacher, batch) -> (state, metrics) (method.md 4).

  The student runs separately on the visible ("strong") and infrared ("weak") views, so BN
  statistics are per modality; the frozen teacher sees the same augmented tensors in inference
  mode. `double_bn_update` reproduces the released code's extra forward pass, which only
  updates the BN running averages a second time with the same batch (knob
  distill.double_bn_update).
  """

  def forward(params, batch_stats, images, code):
    outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                   modality_codes(images.shape[0], code), train=True,
                                   mutable=["batch_stats"])
    return outputs["features"], updates["batch_stats"]

  def student_step(state: TrainState, teacher: FrozenTeacher, batch: dict):
    key = jax.random.fold_in(state.key, state.step)
    key_v, key_i = jax.random.split(key)
    visible = augment.augment_batch(key_v, batch["visible"], views["visible"])
    infrared = augment.augment_batch(key_i, batch["infrared"], views["infrared"])
    n = visible.shape[0]
    teacher_v = model.apply(teacher.variables, visible, modality_codes(n, VISIBLE_CODE),
                            train=False)["embedding"]
    teacher_i = model.apply(teacher.variables, infrared, modality_codes(n, INFRARED_CODE),
                            train=False)["embedding"]
    batch_stats = state.batch_stats
    if double_bn_update:
      _, batch_stats = forward(state.params, batch_stats, visible, VISIBLE_CODE)
      _, batch_stats = forward(state.params, batch_stats, infrared, INFRARED_CODE)

    def loss_fn(params):
      student_v, stats = forward(params, batch_stats, visible, VISIBLE_CODE)
      student_i, stats = forward(params, stats, infrared, INFRARED_CODE)
      loss, terms = distill.dakd_loss(student_v, student_i, teacher_v, teacher_i,
                                      teacher.centres_visible, teacher.centres_infrared, settings)
      return loss, (terms, stats)

    (loss, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(tx, grads, batch_stats=new_stats)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return student_step
