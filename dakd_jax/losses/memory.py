"""Class-centre memories of the teacher stage (method.md 3.2) and the DAKD teacher centres (4.1).

Data flow: at the start of every teacher epoch the extractor embeds the training set in inference
mode and `build_centres` turns those unit embeddings into one unit centre per identity; the
centres of the three views become a `CentreMemories` (`init_memories`), which lives in the train
state. Each step's losses read it (`alignment.py`) and `update_memories` moves it with the step's
embeddings. Memories are never trained by gradients. The student stage uses `build_centres` once
with the frozen teacher (method.md 4.1).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dakd_jax.sharding import gather_rows

# torch.nn.functional.normalize's floor on the norm; keeps all-zero rows at zero.
_NORM_EPS = 1e-12


def unit_rows(x: jax.Array) -> jax.Array:
  """`unit(x) = x / max(||x||, 1e-12)` row-wise; float32 [..., D]. All-zero rows stay zero."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, _NORM_EPS)


@flax.struct.dataclass
class CentreMemories:
  """The four class-centre memories and their epoch-start snapshots, each float32 [C, D].

  global_: `M`, updated by the hard rule; visible / infrared / channel: `M_v`, `M_i`, `M_a`,
  updated by the mean rule; snapshot_*: `S`, `S_v`, `S_i`, `S_a`, fixed for the epoch.
  """
  global_: jax.Array
  visible: jax.Array
  infrared: jax.Array
  channel: jax.Array
  snapshot_global: jax.Array
  snapshot_visible: jax.Array
  snapshot_infrared: jax.Array
  snapshot_channel: jax.Array


def build_centres(embeddings: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Class centres: row c = unit(mean of the embeddings of class c) (method.md 3.2, 4.1).

  Args:
    embeddings: [N, D] unit embeddings (inference mode, no augmentation); not re-normalised here.
    labels: [N] int class of each row, in [0, num_classes). Labels outside that range are
      dropped (a property of `jax.ops.segment_sum`); callers validate labels on the host.
    num_classes: C (static).
  Returns:
    float32 [C, D]. A class with no row gets an all-zero centre: its memory logits are 0 and
    the update rules start it from 0 (so the first update sets it to the batch rows).
  """
  embeddings = jnp.asarray(embeddings, jnp.float32)
  sums = jax.ops.segment_sum(embeddings, labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.float32), labels,
                               num_segments=num_classes)
  return unit_rows(sums / jnp.maximum(counts, 1.0)[:, None])


def init_memories(visible_centres: jax.Array, infrared_centres: jax.Array,
                  channel_centres: jax.Array) -> CentreMemories:
  """Epoch-start memories (method.md 3.2).

  `M = (M_v + M_i + M_a) / 3`, an average of unit rows that is deliberately NOT re-normalised;
  each snapshot is a separate copy (distinct buffers, so the state can be donated).

  Args:
    visible_centres, infrared_centres, channel_centres: [C, D] from `build_centres`.
  Returns:
    CentreMemories, float32.
  Raises:
    ValueError: if the three shapes differ.
  """
  centres = [jnp.asarray(c, jnp.float32)
             for c in (visible_centres, infrared_centres, channel_centres)]
  if len({c.shape for c in centres}) != 1 or centres[0].ndim != 2:
    raise ValueError("init_memories: the three centre matrices must be [C, D] of one shape, "
                     f"got {[c.shape for c in centres]}")
  visible, infrared, channel = centres
  global_ = (visible + infrared + channel) / 3.0
  return CentreMemories(
      global_=global_, visible=visible, infrared=infrared, channel=channel,
      snapshot_global=jnp.array(global_, copy=True),
      snapshot_visible=jnp.array(visible, copy=True),
      snapshot_infrared=jnp.array(infrared, copy=True),
      snapshot_channel=jnp.array(channel, copy=True))


def _hard_update(memory: jax.Array, z: jax.Array, labels: jax.Array, momentum: float):
  """`M[c] <- unit(m M[c] + (1-m) z_hard)`, z_hard = the row of class c least similar to M[c]."""
  num_classes = memory.shape[0]
  similarity = jnp.sum(z * memory[labels], axis=-1)  # [rows]; M[c] need not be unit
  one_hot = labels[:, None] == jnp.arange(num_classes)[None, :]  # [rows, C]
  scores = jnp.where(one_hot, similarity[:, None], jnp.inf)
  # argmin takes the first of equal rows, as the reference's numpy argmin does.
  hardest = jnp.argmin(scores, axis=0)  # [C]
  present = jnp.any(one_hot, axis=0)
  updated = unit_rows(momentum * memory + (1.0 - momentum) * z[hardest])
  return jnp.where(present[:, None], updated, memory)


def _mean_update(memory: jax.Array, z: jax.Array, labels: jax.Array, momentum: float):
  """`M[c] <- unit(m M[c] + (1-m) mean of the rows of class c)` for classes present."""
  num_classes = memory.shape[0]
  sums = jax.ops.segment_sum(z, labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.float32), labels,
                               num_segments=num_classes)
  updated = unit_rows(momentum * memory + (1.0 - momentum) * sums
                      / jnp.maximum(counts, 1.0)[:, None])
  return jnp.where((counts > 0)[:, None], updated, memory)


def update_memories(memories: CentreMemories, z_visible: jax.Array, z_infrared: jax.Array,
                    z_channel: jax.Array, labels: jax.Array, *, hard_momentum: float = 0.1,
                    mean_momentum: float = 0.25) -> CentreMemories:
  """One step's memory update (method.md 3.2), from embeddings computed before the update.

  For every class c present in the batch:
    M[c]   <- unit(0.1 M[c] + 0.9 z_hard), z_hard = among all 3n rows [z_v; z_i; z_a] of class
              c, the one with the lowest cosine to M[c] (first such row on ties);
    M_v[c] <- unit(0.25 M_v[c] + 0.75 mean(z_v rows of class c)), likewise M_i from z_i and
              M_a from z_a.
  Classes absent from the batch and all snapshots are unchanged. The reference loops over
  samples and classes, but each class row is read and written once per step from its own old
  value, so this vectorised form is order-independent and equal to it.

  Args:
    memories: the state's CentreMemories.
    z_visible, z_infrared, z_channel: [n, D] unit embeddings of the three views (stop-gradient
      is applied here).
    labels: [n] int, the class of row k in every view.
    hard_momentum, mean_momentum: weights of the old memory row.
  Returns:
    the updated CentreMemories.
  Raises:
    ValueError: on inconsistent shapes.
  """
  views = [z_visible, z_infrared, z_channel]
  if len({z.shape for z in views}) != 1 or z_visible.ndim != 2 or labels.shape != (
      z_visible.shape[0],) or z_visible.shape[1] != memories.visible.shape[1]:
    raise ValueError(f"update_memories: expected three [n, D={memories.visible.shape[1]}] views "
                     f"and labels [n]; got views {[z.shape for z in views]}, labels "
                     f"{labels.shape}")
  # The update is over the global batch; gathering the (small) batch onto every device keeps
  # the per-class gathers and scatters well defined under Explicit sharding too.
  labels = gather_rows(labels)
  z_v, z_i, z_a = (gather_rows(jax.lax.stop_gradient(jnp.asarray(z, jnp.float32)))
                   for z in views)
  z_all = jnp.concatenate([z_v, z_i, z_a], axis=0)
  labels_all = jnp.concatenate([labels, labels, labels], axis=0)
  return memories.replace(
      global_=_hard_update(memories.global_, z_all, labels_all, hard_momentum),
      visible=_mean_update(memories.visible, z_v, labels, mean_momentum),
      infrared=_mean_update(memories.infrared, z_i, labels, mean_momentum),
      channel=_mean_update(memories.channel, z_a, labels, mean_momentum))
