"""Class centres from passes of a model over the training set, and the frozen teacher.

Teacher stage: the four memories are rebuilt at every epoch start from inference-mode embeddings
of every training image (method.md 3.2). Student stage: the frozen teacher's visible and infrared
centres are computed once (method.md 4.1). Both read the prepared train split through the same
jitted extraction as evaluation.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dakd_jax import builders
from dakd_jax import checkpoint as checkpoint_lib
from dakd_jax import config as config_lib
from dakd_jax import sharding as sharding_lib
from dakd_jax.data import prepare
from dakd_jax.evaluation import extract
from dakd_jax.losses import memory as memory_lib
from dakd_jax.models import resnet
from dakd_jax.train import state as state_lib
from dakd_jax.train import steps as steps_lib

# Fields that must match between a teacher checkpoint and the student config.
TEACHER_MUST_MATCH = ("model.depth", "model.width", "model.modality_specific_stem",
                      "model.non_local", "data.dataset", "data.trial")


@functools.lru_cache(maxsize=None)
def embed_function(model, *, use_flip: bool = False, channel_exchange: bool = False):
  """One embed function per (model, options), so its jit compiles once per run."""
  return steps_lib.make_embed_fn(model, use_flip=use_flip, channel_exchange=channel_exchange)


def zero_memories(num_classes: int, dim: int) -> memory_lib.CentreMemories:
  """Placeholder memories of the right shape; the first epoch start fills them."""
  zeros = jnp.zeros((num_classes, dim), jnp.float32)
  return memory_lib.init_memories(zeros, zeros, zeros)


def create_teacher_state(config: ml_collections.ConfigDict, model, tx, num_classes: int,
                         key_init, key_state, mesh) -> state_lib.TrainState:
  """A fresh, replicated teacher state with zero memories."""
  variables = builders.init_model_variables(config, model, key_init)
  dim = resnet.output_features(config.model.depth, config.model.width)
  return state_lib.create_replicated_state(variables, tx, key_state, mesh,
                                           zero_memories(num_classes, dim))


def _train_embeddings(config, model, variables, data, mesh, modality_code, *,
                      channel_exchange=False, key=None, description=""):
  rows = prepare.modality_rows(data.train_meta, modality_code)
  embeddings = extract.extract_embeddings(
      embed_function(model, channel_exchange=channel_exchange), variables, data.train_source,
      rows, data.train_meta["modality"], batch_size=config.eval.batch_size, mesh=mesh, key=key,
      description=description, show_progress=config.log.progress)
  return embeddings, data.train_meta["label"][rows]


def modality_centres(config, model, variables, data, mesh, modality_code, **kwargs):
  """[C, D] unit centres of one modality (or the channel-exchanged visible view)."""
  embeddings, labels = _train_embeddings(config, model, variables, data, mesh, modality_code,
                                         **kwargs)
  return memory_lib.build_centres(jnp.asarray(embeddings), jnp.asarray(labels),
                                  data.num_classes)


def build_teacher_memories(config, model, variables, data, mesh, key):
  """Epoch-start memories M_v, M_i, M_a and M, with snapshots (method.md 3.2)."""
  visible = modality_centres(config, model, variables, data, mesh, 0,
                             description="memory: visible")
  infrared = modality_centres(config, model, variables, data, mesh, 1,
                              description="memory: infrared")
  channel = modality_centres(config, model, variables, data, mesh, 0, channel_exchange=True,
                             key=key, description="memory: channel")
  memories = memory_lib.init_memories(visible, infrared, channel)
  return sharding_lib.replicate(memories, mesh)


def find_best_checkpoint(source: str, *, hint: str) -> tuple[str, int]:
  """(checkpoint directory, step) of a run: its best-mAP step, else its newest.

  `source` is a stage workdir (holding checkpoints/) or a checkpoint directory; `hint` says how
  to fix a missing one.
  """
  directory = source
  if os.path.isdir(os.path.join(source, "checkpoints")):
    directory = os.path.join(source, "checkpoints")
  steps = checkpoint_lib.complete_steps(directory) if os.path.isdir(directory) else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {source!r}: {hint}")
  manager = checkpoint_lib.CheckpointManager(directory, read_only=True)
  step = manager.best_step() or manager.latest_step()
  manager.close()
  return directory, step


def check_teacher_matches(teacher_config: dict, config: ml_collections.ConfigDict,
                          where: str) -> None:
  """Raises ConfigError naming every architecture/data field the teacher differs in."""
  problems = []
  for field in TEACHER_MUST_MATCH:
    section, name = field.split(".")
    theirs = teacher_config.get(section, {}).get(name)
    ours = config_lib.get_field(config, field)
    if field == "data.trial" and config.data.dataset != "regdb":
      continue
    if theirs != ours:
      problems.append(f"{field}: teacher {theirs!r}, student config {ours!r}")
  if problems:
    raise config_lib.ConfigError(f"the teacher checkpoint {where} does not fit the student config ("
                     + "; ".join(problems) + "). Use the teacher's values (the student has the "
                     "teacher's architecture) or train a matching teacher.")


def restore_model_variables(config: ml_collections.ConfigDict, model, data, source: str, mesh,
                            *, hint: str) -> tuple[dict, str]:
  """{'params', 'batch_stats'} of a teacher or student checkpoint (best-mAP step, else newest).

  The checkpoint's config must match config's architecture (TEACHER_MUST_MATCH); the whole
  saved state is restored onto an abstract target for the current mesh and the model variables
  are taken from it. Returns (variables, 'directory step N').
  """
  directory, step = find_best_checkpoint(source, hint=hint)
  manager = checkpoint_lib.CheckpointManager(directory, read_only=True)
  where = f"{directory} step {step}"
  metadata = manager.read_metadata(step)
  check_teacher_matches(metadata.get("config", {}), config, where)
  dim = resnet.output_features(config.model.depth, config.model.width)
  is_teacher = metadata.get("stage", "teacher") == "teacher"
  tx = (state_lib.make_teacher_optimizer(config, steps_per_epoch=1) if is_teacher
        else state_lib.make_student_optimizer(config))
  image_shape = (config.data.image_height, config.data.image_width)

  def abstract_state():
    variables = resnet.init_variables(model, jax.random.key(0), image_shape)
    memories = zero_memories(data.num_classes, dim) if is_teacher else None
    return state_lib.create_state(variables, tx, jax.random.key(0), memories)

  target = state_lib.abstract_state(abstract_state, sharding_lib.replicated(mesh))
  try:
    restored, _, _ = manager.restore(step, target, restore_data=False)
  except ValueError as error:
    raise config_lib.ConfigError(f"cannot restore {where}: {error}. Its shapes do not match this config's "
                     "model (or number of identities).") from error
  finally:
    manager.close()
  return {"params": restored.params, "batch_stats": restored.batch_stats}, where


def load_frozen_teacher(config: ml_collections.ConfigDict, model, data: prepare.DataBundle,
                        teacher_source: str, mesh) -> steps_lib.FrozenTeacher:
  """Restores the teacher's variables and computes its fixed centres C_v, C_i (method.md 4.1)."""
  variables, where = restore_model_variables(
      config, model, data, teacher_source, mesh,
      hint="train the teacher first (--config.stage=teacher or all) or point "
           "--config.distill.teacher_checkpoint at a teacher workdir or checkpoint directory")
  dim = resnet.output_features(config.model.depth, config.model.width)
  centres_visible = modality_centres(config, model, variables, data, mesh, 0,
                                     description="teacher centres: visible")
  centres_infrared = modality_centres(config, model, variables, data, mesh, 1,
                                      description="teacher centres: infrared")
  teacher = steps_lib.FrozenTeacher(variables=variables, centres_visible=centres_visible,
                                    centres_infrared=centres_infrared)
  if jax.process_index() == 0:
    print(f"dakd_jax: teacher from {where} ({data.num_classes} centres of dim {dim})")
  return sharding_lib.replicate(teacher, mesh)
