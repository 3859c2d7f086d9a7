"""Teacher-stage losses: memory cross-entropies, modality alignment KL, global-centre triplet.

Stage 1 of the method (method.md 3.3, the MCE recipe). The teacher step runs the network on the
stacked views [visible; infrared; channel-augmented] in one batch, passes the three BNNeck
blocks to `teacher_loss`, and afterwards moves the memories with
`memory.update_memories(memories, unit_rows(g_v), unit_rows(g_i), unit_rows(g_a), labels)`,
using the embeddings of this forward pass (before the parameter update). All losses read the
memories as they were at the start of the step; they carry no gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from dakd_jax.errors import Bounds, check_bounds
from dakd_jax.losses.memory import CentreMemories, unit_rows
from dakd_jax.sharding import gather_rows

# Floor of squared distances before the square root (finite gradient at distance 0).
_MIN_DIST_SQ = 1e-12


def _memory_logits(z: jax.Array, centres: jax.Array, temperature: float) -> jax.Array:
  # Full float32 matmul: TF32 on GPUs would be visible in logits scaled by 1/0.05.
  centres = jax.lax.stop_gradient(jnp.asarray(centres, jnp.float32))
  return jnp.matmul(jnp.asarray(z, jnp.float32), centres.T,
                    precision=jax.lax.Precision.HIGHEST) / temperature


def memory_cross_entropy(z: jax.Array, centres: jax.Array, labels: jax.Array,
                         temperature: float) -> jax.Array:
  """`CE(z M^T / tau, y)`, softmax cross-entropy averaged over rows (method.md 3.3 items 1-2).

  Args:
    z: [m, D] unit embeddings.
    centres: [C, D] memory (no gradient flows into it).
    labels: [m] int in [0, C).
    temperature: tau > 0.
  Returns:
    float32 scalar `mean_k (logsumexp_c l_kc - l_k,y_k)`.
  """
  logits = _memory_logits(z, centres, temperature)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def modality_kl(z_visible: jax.Array, z_infrared: jax.Array, z_channel: jax.Array,
                snapshot_visible: jax.Array, snapshot_infrared: jax.Array,
                snapshot_channel: jax.Array, temperature: float) -> jax.Array:
  """Unidirectional modality-alignment KL against the snapshots (method.md 3.3 item 3).

  P = log_softmax([z_v S_v^T; z_i S_i^T; z_a S_a^T] / tau)     (predictions, with gradient)
  Q = softmax([z_i S_v^T; z_v S_i^T; z_a S_i^T] / tau)         (targets, stop-gradient)
  L = (1/3n) sum_rows sum_c Q (log Q - P).
  Row k of the first block compares visible image k with the paired infrared image k, both
  against the visible centres; the second block mirrors it; the third compares the augmented
  view against its own centres with itself against the infrared centres.

  Args:
    z_visible, z_infrared, z_channel: [n, D] unit embeddings of the three views, row k of each
      from the same identity.
    snapshot_visible, snapshot_infrared, snapshot_channel: [C, D] epoch-start snapshots.
    temperature: tau > 0.
  Returns:
    float32 scalar.
  """
  predictions = jnp.concatenate([
      _memory_logits(z_visible, snapshot_visible, temperature),
      _memory_logits(z_infrared, snapshot_infrared, temperature),
      _memory_logits(z_channel, snapshot_channel, temperature)], axis=0)
  targets = jnp.concatenate([
      _memory_logits(z_infrared, snapshot_visible, temperature),
      _memory_logits(z_visible, snapshot_infrared, temperature),
      _memory_logits(z_channel, snapshot_infrared, temperature)], axis=0)
  log_p = jax.nn.log_softmax(predictions, axis=-1)
  log_q = jax.lax.stop_gradient(jax.nn.log_softmax(targets, axis=-1))
  return jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1))


def centre_triplet(z: jax.Array, labels: jax.Array, snapshot_global: jax.Array,
                   margin: float = 0.3) -> jax.Array:
  """Global-centre triplet loss (method.md 3.3 item 4).

  For each row k: `d+ = ||z_k - S[y_k]||`, `d- = min over batch rows j with y_j != y_k of
  ||z_k - S[y_j]||` (nearest centre among the other identities present in the batch);
  loss `mean_k max(0, d+ - d- + margin)`. Distances are `sqrt(max(||z||^2 + ||s||^2 - 2 z.s,
  1e-12))`. A row whose batch holds no other identity contributes 0.

  Args:
    z: [m, D] unit embeddings (all views stacked).
    labels: [m] int.
    snapshot_global: [C, D] global snapshot `S` (not re-normalised; no gradient).
    margin: hinge margin.
  Returns:
    float32 scalar.
  """
  z = jnp.asarray(z, jnp.float32)
  snapshot = jax.lax.stop_gradient(jnp.asarray(snapshot_global, jnp.float32))
  all_labels = gather_rows(labels)
  batch_centres = snapshot[all_labels]  # [m, D], column j of the distances is S[y_j]
  dist_sq = (jnp.sum(z**2, axis=-1)[:, None] + jnp.sum(batch_centres**2, axis=-1)[None, :]
             - 2.0 * jnp.matmul(z, batch_centres.T, precision=jax.lax.Precision.HIGHEST))
  dist = jnp.sqrt(jnp.maximum(dist_sq, _MIN_DIST_SQ))  # [m, m]
  same = labels[:, None] == all_labels[None, :]
  # All same-identity columns hold the same centre; max picks it as the reference does.
  d_pos = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
  d_neg = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  return jnp.mean(jnp.maximum(d_pos - d_neg + margin, 0.0))


NON_NEGATIVE = Bounds(0.0)
POSITIVE = Bounds(0.0, low_inclusive=False)


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
  """Static settings of the teacher loss (method.md 3.3; defaults = released values).

  memory_temperature: tau of all memory logits (0.05).
  weight_view: on L_v + L_i (w_sid = 1.0).
  weight_channel: the whole coefficient on L_a (w_sid * w_caid = 0.4).
  weight_kl: on the modality KL (1.2).
  weight_triplet: on the global-centre triplet (1.0).
  weight_global: on the global memory loss (1.0).
  triplet_margin: 0.3.
  """
  memory_temperature: float = 0.05
  weight_view: float = 1.0
  weight_channel: float = 0.4
  weight_kl: float = 1.2
  weight_triplet: float = 1.0
  weight_global: float = 1.0
  triplet_margin: float = 0.3

  def __post_init__(self):
    # The one declaration of these bounds: start-up builds the settings and names the config
    # field of a refused value (builders.teacher_settings).
    for field in dataclasses.fields(self):
      bounds = POSITIVE if field.name == "memory_temperature" else NON_NEGATIVE
      check_bounds("TeacherSettings", field.name, getattr(self, field.name), bounds)


def teacher_loss(g_visible: jax.Array, g_infrared: jax.Array, g_channel: jax.Array,
                 labels: jax.Array, memories: CentreMemories,
                 settings: TeacherSettings) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """The teacher-stage loss (method.md 3.3, "Total").

  With z = unit(g) per view and z_all = [z_v; z_i; z_a], labels [y; y; y]:
    L = w_gc centre_triplet(z_all, S) + w_g CE(z_all M^T/tau) + w_view (CE(z_v M_v^T/tau)
        + CE(z_i M_i^T/tau)) + w_a CE(z_a M_a^T/tau) + w_kl modality_kl(z_v, z_i, z_a, S_*).
  M, M_* are the current memories, S, S_* the snapshots; none carries gradient. The memory
  update is left to the caller (`update_memories` with `unit_rows(g_*)`, see module doc).

  Args:
    g_visible, g_infrared, g_channel: [n, D] BNNeck outputs (training mode) of the three views.
    labels: [n] int, the identity of row k in every view.
    memories: CentreMemories at the start of the step.
    settings: TeacherSettings.
  Returns:
    (loss, terms): float32 scalar and a dict of float32 scalars: memory_global, memory_visible,
    memory_infrared, memory_channel, modality_kl, centre_triplet.
  Raises:
    ValueError: on inconsistent shapes.
  """
  views = [g_visible, g_infrared, g_channel]
  if len({g.shape for g in views}) != 1 or g_visible.ndim != 2 or labels.shape != (
      g_visible.shape[0],):
    raise ValueError("teacher_loss: expected three [n, D] views and labels [n], got views "
                     f"{[g.shape for g in views]}, labels {labels.shape}")
  z_v, z_i, z_a = (unit_rows(g) for g in views)
  z_all = jnp.concatenate([z_v, z_i, z_a], axis=0)
  labels_all = jnp.concatenate([labels, labels, labels], axis=0)
  tau = settings.memory_temperature
  terms = {
      "memory_global": memory_cross_entropy(z_all, memories.global_, labels_all, tau),
      "memory_visible": memory_cross_entropy(z_v, memories.visible, labels, tau),
      "memory_infrared": memory_cross_entropy(z_i, memories.infrared, labels, tau),
      "memory_channel": memory_cross_entropy(z_a, memories.channel, labels, tau),
      "modality_kl": modality_kl(z_v, z_i, z_a, memories.snapshot_visible,
                                 memories.snapshot_infrared, memories.snapshot_channel, tau),
      "centre_triplet": centre_triplet(z_all, labels_all, memories.snapshot_global,
                                       settings.triplet_margin),
  }
  loss = (settings.weight_triplet * terms["centre_triplet"]
          + settings.weight_global * terms["memory_global"]
          + settings.weight_view * (terms["memory_visible"] + terms["memory_infrared"])
          + settings.weight_channel * terms["memory_channel"]
          + settings.weight_kl * terms["modality_kl"])
  return loss, terms
