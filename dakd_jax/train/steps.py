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
import numpy as np
import optax

from dakd_jax import augment
from dakd_jax.losses import alignment
from dakd_jax.losses import distill
from dakd_jax.losses import memory as memory_lib
from dakd_jax.modalities import INFRARED_CODE, VISIBLE_CODE
from dakd_jax.models import batch_norm
from dakd_jax.train.state import TrainState


STUDENT_FORWARDS = batch_norm.STUDENT_FORWARDS


@flax.struct.dataclass
class FrozenTeacher:
  """The student stage's teacher: inference-mode variables and its fixed class centres."""
  variables: Any  # {'params', 'batch_stats'}
  centres_visible: jax.Array  # [C, D] unit rows (method.md 4.1)
  centres_infrared: jax.Array  # [C, D]


def modality_codes(n: int, code: int) -> np.ndarray:
  """int32 [n] filled with a modality code (the stem routing of n images of one modality).

  A NumPy array: the step's codes are known when it is compiled, so under the CPU setting each
  stem runs on its own images only (resnet.static_modality_runs).
  """
  return np.full((n,), code, np.int32)


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
    modality = np.concatenate([modality_codes(n, VISIBLE_CODE), modality_codes(n, INFRARED_CODE),
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


def both_views(visible: jax.Array, infrared: jax.Array) -> tuple[jax.Array, np.ndarray]:
  """One batch [visible; infrared] ([2n, H, W, 3]) and its modality codes ([2n] int32)."""
  n = visible.shape[0]
  codes = np.concatenate([modality_codes(n, VISIBLE_CODE), modality_codes(n, INFRARED_CODE)])
  return jnp.concatenate([visible, infrared]), codes


def teacher_embeddings(model, variables, visible: jax.Array,
                       infrared: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The frozen teacher's unit embeddings of both views from ONE inference-mode call.

  visible, infrared: [n, H, W, 3] normalised images. Returns (t_v, t_i), each [n, D] float32.
  Inference mode uses the running statistics, so each image's embedding does not depend on the
  others in the batch: one call on [visible; infrared] equals two calls (method.md 4.1).
  """
  n = visible.shape[0]
  embedding = model.apply(variables, *both_views(visible, infrared), train=False)["embedding"]
  return embedding[:n], embedding[n:]


def student_features(model, variables: dict, visible: jax.Array, infrared: jax.Array, *,
                     forward: str = "two_calls") -> tuple[jax.Array, jax.Array, Any]:
  """The student's training-mode BNNeck features with BN statistics per modality.

  variables: {'params', 'batch_stats'}; visible, infrared: [n, H, W, 3] normalised images.
  forward: "two_calls" runs the network on the visible then the infrared batch, as the released
  code does; "grouped" runs it once on [visible; infrared] with `bn_groups=2`, which gives the
  same features, gradients and running averages (the visible half moves them first).
  Returns (s_v [n, D], s_i [n, D], the updated batch_stats). Raises ValueError for another
  `forward`.
  """
  n = visible.shape[0]
  if forward == "grouped":
    outputs, updates = model.apply(variables, *both_views(visible, infrared), train=True,
                                   bn_groups=2, mutable=["batch_stats"])
    features = outputs["features"]
    return features[:n], features[n:], updates["batch_stats"]
  if forward != "two_calls":
    raise ValueError(f"student forward must be one of {STUDENT_FORWARDS}, got {forward!r}")
  batch_stats = variables["batch_stats"]
  features = []
  for images, code in ((visible, VISIBLE_CODE), (infrared, INFRARED_CODE)):
    outputs, updates = model.apply({"params": variables["params"], "batch_stats": batch_stats},
                                   images, modality_codes(n, code), train=True,
                                   mutable=["batch_stats"])
    features.append(outputs["features"])
    batch_stats = updates["batch_stats"]
  return features[0], features[1], batch_stats


def make_student_step(model, tx: optax.GradientTransformation,
                      settings: distill.DistillSettings, views: dict,
                      *, double_bn_update: bool = False,
                      student_forward: str = "two_calls") -> Callable:
  """Returns student_step(state, teacher, batch) -> (state, metrics) (method.md 4).

  The student normalises the visible ("strong") and infrared ("weak") views with separate BN
  statistics (`student_features`, `student_forward` = "grouped" or "two_calls"); the frozen
  teacher embeds the same augmented tensors in one inference-mode call. `double_bn_update`
  reproduces the released code's extra forward pass, whose only effect is a second update of
  the BN running averages with the same batch (knob distill.double_bn_update); it is computed
  in closed form from this step's own update (`batch_norm.repeat_running_average_update`),
  without running the network again.
  """
  if student_forward not in STUDENT_FORWARDS:
    raise ValueError(f"student_forward must be one of {STUDENT_FORWARDS}, got "
                     f"{student_forward!r}")

  def student_step(state: TrainState, teacher: FrozenTeacher, batch: dict):
    key = jax.random.fold_in(state.key, state.step)
    key_v, key_i = jax.random.split(key)
    visible = augment.augment_batch(key_v, batch["visible"], views["visible"])
    infrared = augment.augment_batch(key_i, batch["infrared"], views["infrared"])
    teacher_v, teacher_i = teacher_embeddings(model, teacher.variables, visible, infrared)

    def loss_fn(params):
      student_v, student_i, stats = student_features(
          model, {"params": params, "batch_stats": state.batch_stats}, visible, infrared,
          forward=student_forward)
      loss, terms = distill.dakd_loss(student_v, student_i, teacher_v, teacher_i,
                                      teacher.centres_visible, teacher.centres_infrared, settings)
      return loss, (terms, stats)

    (loss, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if double_bn_update:
      def update(batch_stats):
        return student_features(model, {"params": state.params, "batch_stats": batch_stats},
                                visible, infrared, forward=student_forward)[2]
      new_stats = batch_norm.repeat_running_average_update(update, state.batch_stats,
                                                           new_stats)
    new_state = state.apply_gradients(tx, grads, batch_stats=new_stats)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return student_step
