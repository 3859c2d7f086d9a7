"""The pretrain stage (the demo's stand-in for ImageNet weights) and native variable files."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax import augment
from dakd_jax import builders
from dakd_jax import config as config_lib
from dakd_jax.models import weights
from dakd_jax.train import pretrain

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "demo.py")


def small_config(*overrides):
  return config_lib.load_config(DEMO, ["model.width=4", "data.image_height=48",
                                       "data.image_width=32", *overrides])


def test_identity_cross_entropy_matches_numpy_values_and_gradient():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(6, 5)).astype(np.float32)
  classifier = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([0, 3, 1, 1, 2, 3])
  logits = features.astype(np.float64) @ classifier
  shifted = logits - logits.max(1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
  expected = -np.mean(np.log(probs[np.arange(6), labels]))
  expected_accuracy = np.mean(logits.argmax(1) == labels)
  # d/dfeatures of the mean CE: (softmax - onehot) W^T / m.
  onehot = np.eye(4)[labels]
  expected_grad = (probs - onehot) @ classifier.T / 6

  loss, accuracy = pretrain.identity_cross_entropy(jnp.asarray(features), jnp.asarray(classifier),
                                                   jnp.asarray(labels))
  grad = jax.grad(lambda f: pretrain.identity_cross_entropy(f, jnp.asarray(classifier),
                                                            jnp.asarray(labels))[0])(
                                                                jnp.asarray(features))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(accuracy) == pytest.approx(expected_accuracy)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-6)


def test_native_variables_round_trip_whole_model(tmp_path):
  config = small_config()
  model = builders.model_from_config(config)
  saved = builders.init_model_variables(config, model, jax.random.key(1))
  path = str(tmp_path / "sub" / "model.npz")
  weights.save_variables(saved, path)
  assert os.listdir(tmp_path / "sub") == ["model.npz"]  # no temporary left behind
  fresh = builders.init_model_variables(config, model, jax.random.key(2))
  loaded = weights.load_pretrained(fresh, path, depth=config.model.depth)
  assert jax.tree.structure(loaded) == jax.tree.structure(saved)
  jax.tree.map(np.testing.assert_array_equal, loaded, saved)
  # Every leaf is replaced, including both stems (which a torchvision file cannot tell apart).
  stems = [name for name in loaded["params"] if name.startswith("stem")]
  assert len(stems) == 2
  # ... and the stems' random kernels did differ before loading (the load did something).
  for stem in stems:
    differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), fresh["params"][stem],
                           saved["params"][stem])
    assert any(jax.tree.leaves(differs))


def test_native_variables_errors_name_the_problem(tmp_path):
  config = small_config()
  model = builders.model_from_config(config)
  variables = builders.init_model_variables(config, model, jax.random.key(0))
  with pytest.raises(weights.WeightsError, match=r"\.npz"):
    weights.save_variables(variables, str(tmp_path / "model.safetensors"))
  # Files saved from models of another width, and with one shared stem instead of two.
  for other, message in (("model.width=8", r"shape mismatch for .*another width"),
                         ("model.modality_specific_stem=False",
                          r"missing \d+ .*modality_specific_stem")):
    path = str(tmp_path / "other.npz")
    other_config = small_config(other)
    weights.save_variables(builders.init_model_variables(
        other_config, builders.model_from_config(other_config), jax.random.key(0)), path)
    with pytest.raises(weights.WeightsError, match=message):
      weights.load_pretrained(variables, path, depth=18)


def test_pretrain_config_uses_its_own_persons_and_leaves_config_alone():
  config = small_config("pretrain.num_ids=30", "pretrain.seed=7")
  derived = pretrain.pretrain_config(config)
  assert derived.data.root == config.pretrain.data_root != config.data.root
  assert (derived.synthetic.num_train_ids + derived.synthetic.num_val_ids) == 30
  assert derived.synthetic.seed == 7 and derived.synthetic.enabled
  assert derived.synthetic.num_test_ids == config.pretrain.num_test_ids
  assert config.synthetic.seed == 0 and config.data.root == "data/synthetic_sysu"
  assert derived.model.to_dict() == config.model.to_dict()


def test_with_pretrained_init(tmp_path):
  off = small_config("pretrain.enabled=False")
  assert pretrain.with_pretrained_init(off, str(tmp_path)) is off
  config = small_config()
  with pytest.raises(FileNotFoundError, match="backbone.npz does not exist: run the pretrain"):
    pretrain.with_pretrained_init(config, str(tmp_path))
  open(pretrain.weights_path(str(tmp_path)), "wb").close()
  derived = pretrain.with_pretrained_init(config, str(tmp_path))
  assert derived.model.init_weights == os.path.join(str(tmp_path), "backbone.npz")
  assert config.model.init_weights == ""


@pytest.mark.parametrize("overrides, message", [
    (("pretrain.enabled=False", "stage=pretrain"), "needs config.pretrain.enabled"),
    (("pretrain.data_root=data/synthetic_sysu",), "is the experiment's data.root"),
    (("pretrain.seed=0",), "same persons as the test split"),
    (("pretrain.num_ids=1",), "pretrain.num_ids"),
    (("pretrain.lr=0",), "pretrain.lr"),
])
def test_pretrain_config_errors(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(small_config(*overrides), num_devices=1)


@pytest.mark.slow
def test_pretrain_step_learns_a_fixed_batch():
  """Six steps on one batch lower its identity loss (the step trains backbone and classifier)."""
  config = small_config()
  model = builders.model_from_config(config)
  variables = builders.init_model_variables(config, model, jax.random.key(0))
  from dakd_jax import sharding
  from dakd_jax.train import state as state_lib
  import optax
  tx = optax.adam(1e-2)
  mesh = sharding.make_mesh()
  classifier = 0.01 * jax.random.normal(jax.random.key(1), (32, 4))
  state = state_lib.create_replicated_state(
      {"params": {"backbone": variables["params"], "classifier": classifier},
       "batch_stats": variables["batch_stats"]}, tx, jax.random.key(2), mesh)
  rng = np.random.default_rng(0)
  batch = {"visible": rng.integers(0, 256, (8, 48, 32, 3), dtype=np.uint8),
           "infrared": rng.integers(0, 256, (8, 48, 32, 3), dtype=np.uint8),
           "labels": np.repeat(np.arange(4, dtype=np.int32), 2)}
  # No random augmentation: every step sees the same normalised batch.
  plain = augment.AugmentSettings(pad=0, flip_prob=0.0, erasing_prob=0.0, use_cutswap=False)
  step = jax.jit(pretrain.make_pretrain_step(model, tx, {"visible": plain, "infrared": plain}))
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 6
  assert losses[-1] < 0.5 * losses[0], losses
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0
