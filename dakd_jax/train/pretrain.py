"""Optional stage 0: supervised pretraining on a separate synthetic set, a stand-in for ImageNet.

The method starts both networks from ImageNet weights (method.md 2.4). From random weights the
memory-based teacher does learn, but slowly: on the demo's data the released-code teacher (ours
and the authors' PyTorch one alike) reaches about 15% rank-1 after ~1,000 steps (issue 17),
several CPU minutes, where the demo has seconds. Where no ImageNet file exists (the demo, the
tests) this stage trains the same network with a linear identity classifier shared by both
modalities on *other* persons (`config.pretrain`: its own folder and seed), then writes the
whole model to `<stage workdir>/backbone.npz`, which the teacher and the student load as their
initial weights.
It runs through the same loop as the other stages (progress, logs, checkpoints, resume) and
ends with an evaluation on the pretraining set's own held-out persons.
"""
from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dakd_jax import augment
from dakd_jax import errors
from dakd_jax import stage_parts
from dakd_jax.data import specs
from dakd_jax.errors import CheckpointNotFoundError
from dakd_jax.modalities import INFRARED_CODE, VISIBLE_CODE
from dakd_jax.models import weights
from dakd_jax.train import loop
from dakd_jax.train import state as state_lib
from dakd_jax.train import steps as steps_lib

WEIGHTS_NAME = "backbone.npz"


def weights_path(stage_workdir: str) -> str:
  """Where the pretrain stage writes the initial weights of the later stages."""
  return os.path.join(stage_workdir, WEIGHTS_NAME)


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the pretraining run: config with its data replaced by config.pretrain's.

  A SYSU-style synthetic tree at pretrain.data_root (pretrain.seed, so other persons than the
  experiment's), evaluated once at the end with one all-search single-shot trial.
  """
  derived = copy.deepcopy(config)
  p = config.pretrain
  derived.data.dataset = specs.SYSU_MM01.name
  derived.data.root = p.data_root
  derived.synthetic.enabled = True
  derived.synthetic.num_train_ids = p.num_ids - 1
  derived.synthetic.num_val_ids = 1  # SYSU trains on train + val identities.
  derived.synthetic.num_test_ids = p.num_test_ids
  derived.synthetic.images_per_camera = p.images_per_camera
  derived.synthetic.seed = p.seed
  derived.eval.training_modes = ("all",)
  derived.eval.num_trials = 1
  # Its few held-out persons cannot fill a longer CMC curve.
  derived.eval.max_rank = min(config.eval.max_rank, p.num_test_ids)
  # The final weights initialise the later stages; its evaluation only reports.
  derived.checkpoint.select = "last"
  return derived


def pretrained_init(config: ml_collections.ConfigDict,
                    stage_workdir: str) -> ml_collections.ConfigDict:
  """config unchanged without pretraining; else a copy whose model.init_weights is the file the
  pretrain stage writes in `stage_workdir` (the config the teacher and student run with, and
  store in their checkpoints), whether the file exists yet or not."""
  if not config.pretrain.enabled:
    return config
  derived = copy.deepcopy(config)
  derived.model.init_weights = weights_path(stage_workdir)
  return derived


def with_pretrained_init(config: ml_collections.ConfigDict,
                         stage_workdir: str) -> ml_collections.ConfigDict:
  """`pretrained_init`, once the pretrain stage has written its weights. Raises
  CheckpointNotFoundError when they are missing."""
  derived = pretrained_init(config, stage_workdir)
  path = derived.model.init_weights
  if config.pretrain.enabled and not os.path.isfile(path):
    raise CheckpointNotFoundError(
        f"config.pretrain.enabled is set but {path} does not exist: run the pretrain stage "
        "first (--config.stage=pretrain or all), or set --config.pretrain.enabled=False")
  return derived


def identity_cross_entropy(features: jax.Array, classifier: jax.Array,
                           labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy of `features @ classifier` and its accuracy.

  features: [m, D] (BNNeck output, training mode); classifier: [D, C]; labels: [m] in [0, C).
  Returns (mean_k -log softmax(f_k W)[y_k], mean_k [argmax f_k W == y_k]), float32 scalars.
  """
  logits = jnp.asarray(features, jnp.float32) @ classifier
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def make_pretrain_step(model, tx: optax.GradientTransformation, views: dict):
  """Returns pretrain_step(state, batch) -> (state, metrics).

  Both modalities go through the network in one batch [visible; infrared], augmented as the
  teacher's views; ONE classifier scores both, so an identity's visible and infrared images
  are pulled to the same class direction (the cross-modal agreement the teacher builds on).
  state.params = {'backbone': model params, 'classifier': [D, C]}.
  """

  def pretrain_step(state: state_lib.TrainState, batch: dict):
    key_v, key_i = jax.random.split(jax.random.fold_in(state.key, state.step))
    n = batch["labels"].shape[0]
    images = jnp.concatenate([augment.augment_batch(key_v, batch["visible"], views["visible"]),
                              augment.augment_batch(key_i, batch["infrared"], views["infrared"])])
    modality = np.concatenate([steps_lib.modality_codes(n, VISIBLE_CODE),
                               steps_lib.modality_codes(n, INFRARED_CODE)])
    labels = jnp.concatenate([batch["labels"], batch["labels"]])

    def loss_fn(params):
      outputs, updates = model.apply(
          {"params": params["backbone"], "batch_stats": state.batch_stats}, images, modality,
          train=True, mutable=["batch_stats"])
      loss, accuracy = identity_cross_entropy(outputs["features"], params["classifier"], labels)
      return loss, (accuracy, updates["batch_stats"])

    (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state = state.apply_gradients(tx, grads, batch_stats=batch_stats)
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}

  return pretrain_step


def _export(state: state_lib.TrainState, path: str) -> None:
  """Process 0 writes the model variables; the others wait until the file exists."""
  if jax.process_index() == 0:
    variables = jax.device_get({"params": state.params["backbone"],
                                "batch_stats": state.batch_stats})
    with errors.writing(f"pretrained weights {path}"):
      weights.save_variables(variables, path)
    print(f"dakd_jax: pretrained weights written to {path}", flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # Multi-host only.
    multihost_utils.sync_global_devices("dakd_jax: pretrained weights written")


def train_pretrain(config: ml_collections.ConfigDict, workdir: str,
                   parts: stage_parts.TrainingParts) -> dict:
  """Stage 0: trains the network and classifier of `parts`, writes `weights_path(workdir)`.

  `config` is `pretrain_config`'s (the run's config with the pretraining set's data), `parts`
  built from it (`stage_parts.make_training_parts(..., "pretrain")`: the network starts from
  config.model.init_weights when set, else random). `workdir` is the stage's own folder
  (<run workdir>/pretrain). Returns run_stage's summary.
  """
  state = state_lib.create_replicated_state(parts.variables, parts.optimizer, parts.state_key,
                                            parts.mesh)
  step = make_pretrain_step(parts.model, parts.optimizer, parts.views)
  stage = loop.Stage(
      name="pretrain", epochs=config.pretrain.epochs, steps_per_epoch=parts.steps_per_epoch,
      eval_due=lambda epoch: False,  # run_stage still evaluates after the last step
      step_fn=loop.jit_step(step, parts.mesh), on_epoch_start=lambda s, epoch: s,
      variables_of=lambda s: {"params": s.params["backbone"], "batch_stats": s.batch_stats},
      on_finish=lambda s: _export(s, weights_path(workdir)))
  return loop.run_stage(stage, config, workdir, parts, state)
