"""Class centres from passes of a model over the training set, and the frozen teacher.

Teacher stage: the four memories are rebuilt at every epoch start from inference-mode embeddings
of every training image (method.md 3.2). Student stage: the frozen teacher's visible and infrared
centres are computed once (method.md 4.1). Both read the prepared train split through the jitted
extraction evaluation uses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dakd_jax import sharding as sharding_lib
from dakd_jax.data import prepare
from dakd_jax.evaluation import extract
from dakd_jax.losses import memory as memory_lib
from dakd_jax.modalities import INFRARED_CODE, VISIBLE_CODE
from dakd_jax.train import steps as steps_lib


def zero_memories(num_classes: int, dim: int) -> memory_lib.CentreMemories:
  """Placeholder memories of the right shape; the first epoch start fills them."""
  zeros = jnp.zeros((num_classes, dim), jnp.float32)
  return memory_lib.init_memories(zeros, zeros, zeros)


def modality_centres(model, variables, data: prepare.DataBundle, mesh, modality_code: int, *,
                     batch_size: int, channel_exchange: bool = False, key=None,
                     description: str = "", show_progress: bool = True) -> jax.Array:
  """[C, D] unit centres of one modality's training images (or their channel-exchanged view)."""
  rows = prepare.modality_rows(data.train_meta, modality_code)
  embeddings = extract.extract_embeddings(
      extract.embed_function(model, channel_exchange=channel_exchange), variables,
      data.train_source, rows, data.train_meta["modality"], batch_size=batch_size, mesh=mesh,
      key=key, description=description, show_progress=show_progress)
  return memory_lib.build_centres(jnp.asarray(embeddings),
                                  jnp.asarray(np.asarray(data.train_meta["label"])[rows]),
                                  data.num_classes)


def build_teacher_memories(model, variables, data: prepare.DataBundle, mesh, key, *,
                           batch_size: int, show_progress: bool = True):
  """Epoch-start memories M_v, M_i, M_a and M, with snapshots (method.md 3.2)."""
  common = dict(batch_size=batch_size, show_progress=show_progress)
  visible = modality_centres(model, variables, data, mesh, VISIBLE_CODE,
                             description="memory: visible", **common)
  infrared = modality_centres(model, variables, data, mesh, INFRARED_CODE,
                              description="memory: infrared", **common)
  channel = modality_centres(model, variables, data, mesh, VISIBLE_CODE, channel_exchange=True,
                             key=key, description="memory: channel", **common)
  return sharding_lib.replicate(memory_lib.init_memories(visible, infrared, channel), mesh)


def frozen_teacher(model, variables, data: prepare.DataBundle, mesh, *, batch_size: int,
                   show_progress: bool = True) -> steps_lib.FrozenTeacher:
  """The teacher's variables and its fixed centres C_v, C_i (method.md 4.1), replicated."""
  common = dict(batch_size=batch_size, show_progress=show_progress)
  centres_visible = modality_centres(model, variables, data, mesh, VISIBLE_CODE,
                                     description="teacher centres: visible", **common)
  centres_infrared = modality_centres(model, variables, data, mesh, INFRARED_CODE,
                                      description="teacher centres: infrared", **common)
  teacher = steps_lib.FrozenTeacher(variables=variables, centres_visible=centres_visible,
                                    centres_infrared=centres_infrared)
  return sharding_lib.replicate(teacher, mesh)
