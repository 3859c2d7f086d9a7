"""The student step's lean forms against the plain computations they replace.

- one frozen-teacher call on [visible; infrared] equals two calls (inference mode);
- one student call with `bn_groups=2` equals the released two calls, visible then infrared
  (features, gradients, running averages): exactly in float64, to rounding in float32;
- `distill.double_bn_update` in closed form equals running the network again with the same
  batch (the released code's extra forward pass, written here only), and adds no forward pass.

Model-level tests: ResNet-10 (one block per stage, width 4) on 48 x 48 inputs (layer4 map
3 x 3), random BN affine parameters (and running statistics where training ignores them) so
that every BN, including the non-local output BNs, acts. Step-level tests: ResNet-18 (on
ResNet-10 XLA's flop count of the released step falls below the grouped step's: measured,
43.7M against 45.7M; it would not show the released extra passes), from the initial
variables, without non-local blocks (the step's logic is the same; a third less to compile).
The grouped BN runs, per group, the operations a separate call runs; float64 shows the
agreement to 1e-10, float32 to its rounding (see the test's docstring).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dakd_jax import augment
from dakd_jax import builders
from dakd_jax import config as config_lib
from dakd_jax.losses import distill
from dakd_jax.losses import memory as memory_lib
from dakd_jax.models import batch_norm
from dakd_jax.models import resnet
from dakd_jax.train import state as state_lib
from dakd_jax.train import steps as steps_lib
from tests import xla_flags

SIZE = 48
N = 4  # images per modality
MOMENTUM = 0.9


def randomised_variables(model, seed, dtype=jnp.float32, running_statistics=True):
  """Initial variables with random BN scales and shifts, and random running statistics unless
  asked not to (inference through random running statistics overflows), in `dtype`."""
  variables = resnet.tie_stems(resnet.init_variables(model, jax.random.key(seed), (SIZE, SIZE)))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  for path, value in flat.items():
    if path[-1] == "mean" and running_statistics:
      value = rng.normal(0.0, 0.1, value.shape)
    elif path[-1] == "var" and running_statistics:
      value = rng.uniform(0.5, 2.0, value.shape)
    elif path[-1] == "scale" and path[-2] != "gem":
      value = rng.uniform(0.5, 1.5, value.shape)
    elif path[-1] == "bias" and "bn" in path[-2]:
      value = rng.normal(0.0, 0.1, value.shape)
    flat[path] = jnp.asarray(value, dtype)
  return traverse_util.unflatten_dict(flat)


def images(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  visible = rng.normal(0.0, 1.0, (N, SIZE, SIZE, 3))
  infrared = rng.normal(0.3, 0.8, (N, SIZE, SIZE, 3))  # another distribution than visible
  return jnp.asarray(visible, dtype), jnp.asarray(infrared, dtype)


def codes(code):
  return jnp.full((N,), code, jnp.int32)


def released_two_calls(model, variables, visible, infrared):
  """The released student: the network on the visible batch, then on the infrared batch."""
  outputs_v, updates = model.apply(variables, visible, codes(0), train=True,
                                   mutable=["batch_stats"])
  outputs_i, updates = model.apply({"params": variables["params"], **updates}, infrared,
                                   codes(1), train=True, mutable=["batch_stats"])
  return outputs_v["features"], outputs_i["features"], updates["batch_stats"]


def largest_difference(expected, actual, relative=False):
  """max over leaves of max |e - a|; when relative, divided by the leaf's max |e| if above 1
  (gradients that are zero in exact arithmetic, like a bias before a BN, are compared
  absolutely)."""
  def one(e, a):
    e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
    scale = max(1.0, np.abs(e).max()) if relative else 1.0
    return np.abs(e - a).max() / scale
  return max(jax.tree.leaves(jax.tree.map(one, expected, actual)))


@pytest.mark.parametrize("modality_specific_stem", [True, False])
def test_one_teacher_call_equals_two_calls(modality_specific_stem):
  model = resnet.create_model(10, 4, modality_specific_stem=modality_specific_stem)
  variables = randomised_variables(model, 0, running_statistics=False)
  visible, infrared = images(1)
  run = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False)["embedding"])
  teacher_v, teacher_i = jax.jit(
      lambda v, a, b: steps_lib.teacher_embeddings(model, v, a, b))(variables, visible, infrared)
  assert np.all(np.isfinite(teacher_v)) and np.all(np.isfinite(teacher_i))
  np.testing.assert_allclose(teacher_v, run(variables, visible, codes(0)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(teacher_i, run(variables, infrared, codes(1)), rtol=1e-5, atol=1e-6)
  if modality_specific_stem:  # Each half really went through its own stem.
    assert np.abs(np.asarray(teacher_i - run(variables, infrared, codes(0)))).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("modality_specific_stem,dtype", [
    (True, jnp.float32), (True, jnp.float64), (False, jnp.float64)])
def test_grouped_student_call_equals_two_calls(modality_specific_stem, dtype):
  """Same function: values, gradients and running averages agree.

  Both stem modes exactly (float64); float32 rounding with the default two-stream stem (the
  shared stem only removes the grouped stem's split, checked exactly).

  float64, random BN parameters (every BN acts, non-local blocks included): to 1e-10. float32
  from the initial variables (the training start): values and running averages to 1e-5 (the
  per-group operations are those of a separate call), gradients to 1e-4 of their size (the
  weight gradients sum the batch in another order). With random BN parameters the non-local
  output BNs normalise a nearly constant map and amplify float32 rounding to 1e-3, for any
  change of batch, so float32 is checked where the network is well conditioned, compiled as
  users compile (with the suite's quick compile each program rounds its own way: 2e-5).
  """
  is_float64 = dtype == jnp.float64
  with jax.enable_x64(is_float64):
    model = resnet.create_model(10, 4, modality_specific_stem=modality_specific_stem,
                                dtype=dtype)
    if is_float64:
      variables = randomised_variables(model, 2, dtype)
    else:
      variables = resnet.tie_stems(resnet.init_variables(model, jax.random.key(2),
                                                         (SIZE, SIZE)))
    visible, infrared = images(3, dtype)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(2, N, 32)), dtype)

    def loss_and_stats(forward):
      def loss(params):
        s_v, s_i, stats = forward({"params": params, "batch_stats": variables["batch_stats"]})
        return jnp.sum(jnp.stack([s_v, s_i]) * weights), (s_v, s_i, stats)
      # float32 with the users' compiler (tests/xla_flags.py): agreement to rounding is the
      # property of the programs they run; the quick compile rounds each program its own way.
      options = None if is_float64 else xla_flags.USERS_COMPILER_OPTIONS
      return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables["params"]).compile(
          options)(variables["params"])

    (_, expected), expected_grads = loss_and_stats(
        lambda v: released_two_calls(model, v, visible, infrared))
    (_, actual), actual_grads = loss_and_stats(
        lambda v: steps_lib.student_features(model, v, visible, infrared, forward="grouped"))
    assert actual[0].dtype == dtype
    assert largest_difference(expected, actual) <= (1e-10 if is_float64 else 1e-5)
    assert largest_difference(expected_grads, actual_grads, relative=True) <= (
        1e-10 if is_float64 else 1e-4)
    # The two modalities' statistics really differ, so the grouping matters.
    joint, _ = jax.jit(lambda v, x, m: model.apply(v, x, m, train=True,  # one program, not
                                                   mutable=["batch_stats"]))(  # op by op
        variables, jnp.concatenate([visible, infrared]), jnp.concatenate([codes(0), codes(1)]))
    assert np.abs(np.asarray(joint["features"][:N] - expected[0])).max() > 1e-2


def test_grouped_batch_norm_moves_running_averages_in_group_order():
  """r -> m (m r + (1-m) s_1) + (1-m) s_2, by hand, for a plain and a masked grouped BN."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(6, 3, 2, 4)).astype(np.float32)
  x[3:] = 2.0 * x[3:] + 1.0
  mask = np.array([True, True, False, False, True, True])
  for use_mask in (False, True):
    bn = batch_norm.GroupedBatchNorm(groups=2)
    variables = bn.init(jax.random.key(0), x, None, train=False)
    variables = {"params": variables["params"],
                 "batch_stats": {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 3.0)}}
    out, state = bn.apply(variables, x, mask if use_mask else None, train=True,
                          mutable=["batch_stats"])
    mean, var = np.array([0.5] * 4), np.array([3.0] * 4)
    for start in (0, 3):
      group = x[start:start + 3]
      keep = mask[start:start + 3] if use_mask else np.ones(3, bool)
      chosen = group[keep].astype(np.float64)
      mean = MOMENTUM * mean + (1 - MOMENTUM) * chosen.mean(axis=(0, 1, 2))
      var = MOMENTUM * var + (1 - MOMENTUM) * chosen.var(axis=(0, 1, 2))
      normalised = (chosen - chosen.mean(axis=(0, 1, 2))) / np.sqrt(
          chosen.var(axis=(0, 1, 2)) + 1e-5)
      np.testing.assert_allclose(np.asarray(out)[start:start + 3][keep], normalised,
                                 rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["batch_stats"]["var"], var, rtol=1e-5)


@pytest.fixture(scope="module")
def student_setup():
  """A demo config shrunk to ResNet-18 width 4 at 48x48 without non-local blocks (the
  model-level tests above have them), teacher, student (both as initialised for training), a
  uint8 batch; per stem mode."""
  def make(modality_specific_stem):
    config = config_lib.load_config("configs/demo.py", {
        "model.width": 4, "model.non_local": False, "data.image_height": SIZE,
        "data.image_width": SIZE,
        "model.modality_specific_stem": modality_specific_stem}, validate_config=False)
    model = builders.model_from_config(config)
    rng = np.random.default_rng(6)
    batch = {"visible": rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8),
             "infrared": rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8),
             "labels": np.array([0, 0, 1, 1], np.int32)}
    centres = [memory_lib.unit_rows(jnp.asarray(rng.normal(size=(5, 32)), jnp.float32))
               for _ in range(2)]
    teacher = steps_lib.FrozenTeacher(
        builders.init_model_variables(config, model, jax.random.key(7)), *centres)
    tx = builders.make_student_optimizer(config)
    state = state_lib.create_state(builders.init_model_variables(config, model,
                                                                 jax.random.key(8)),
                                   tx, jax.random.key(9))
    return config, model, tx, teacher, state, batch
  return {stem: make(stem) for stem in (True, False)}


def augmented_views(config, state, batch):
  """The step's augmented images, drawn from the step's keys as the step draws them."""
  views = builders.augment_views(config, "student")
  key_v, key_i = jax.random.split(jax.random.fold_in(state.key, state.step))
  return (augment.augment_batch(key_v, batch["visible"], views["visible"]),
          augment.augment_batch(key_i, batch["infrared"], views["infrared"]))


def expected_slope(batch_stats, modality_specific_stem):
  """m^k per leaf: k = 2 moves per step (visible, infrared), except a per-modality stem, which
  sees only its own modality (k = 1)."""
  flat = traverse_util.flatten_dict(batch_stats)
  per_stem = lambda path: modality_specific_stem and path[0].startswith("stem_")
  return traverse_util.unflatten_dict({
      path: np.full(value.shape, MOMENTUM if per_stem(path) else MOMENTUM ** 2)
      for path, value in flat.items()})


@pytest.mark.parametrize("student_forward", ["grouped", "two_calls"])
@pytest.mark.parametrize("modality_specific_stem", [True, False])
def test_double_bn_update_closed_form_equals_two_forward_passes(student_setup,
                                                                modality_specific_stem,
                                                                student_forward):
  config, model, _, _, state, batch = student_setup[modality_specific_stem]
  visible, infrared = augmented_views(config, state, batch)

  @jax.jit
  def update(batch_stats):
    return steps_lib.student_features(
        model, {"params": state.params, "batch_stats": batch_stats}, visible, infrared,
        forward=student_forward)[2]

  once = update(state.batch_stats)
  twice = update(once)  # The released code: the network runs again with the same batch.
  closed = jax.jit(batch_norm.repeat_running_average_update, static_argnums=0)(
      update, state.batch_stats, once)
  assert largest_difference(twice, closed) <= 1e-6
  assert largest_difference(once, twice) > 1e-3  # A second update is visible at all.
  # The slope the closed form uses is m^k with k read off the network's structure.
  _, slope = jax.jvp(update, (state.batch_stats,),
                     (jax.tree.map(jnp.ones_like, state.batch_stats),))
  assert largest_difference(expected_slope(state.batch_stats, modality_specific_stem),
                            slope) <= 1e-7


def released_double_update_step(model, tx, settings, views):
  """The released student step, for comparison only: an extra forward pass of both views that
  moves the BN running averages, then the forward-backward pass of `make_student_step`."""
  def step(state, teacher, batch):
    key_v, key_i = jax.random.split(jax.random.fold_in(state.key, state.step))
    visible = augment.augment_batch(key_v, batch["visible"], views["visible"])
    infrared = augment.augment_batch(key_i, batch["infrared"], views["infrared"])
    run_teacher = lambda x, m: model.apply(teacher.variables, x, codes(m), train=False)
    teacher_v, teacher_i = (run_teacher(visible, 0)["embedding"],
                            run_teacher(infrared, 1)["embedding"])
    _, _, stats = released_two_calls(model, state.variables, visible, infrared)

    def loss_fn(params):
      s_v, s_i, new_stats = released_two_calls(
          model, {"params": params, "batch_stats": stats}, visible, infrared)
      loss, _ = distill.dakd_loss(s_v, s_i, teacher_v, teacher_i, teacher.centres_visible,
                                  teacher.centres_infrared, settings)
      return loss, new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(tx, grads, batch_stats=new_stats), {"loss": loss}
  return step


@pytest.fixture(scope="module")
def student_steps(student_setup):
  """Compiled student steps (two-stream stem) and their results on one state and batch, by
  name: grouped (single BN update), double (grouped, closed-form double update), released (the
  released two-forward double update). Grouped against two calls in float32 is checked at the
  network level above (values, gradients, running averages)."""
  config, model, tx, teacher, state, batch = student_setup[True]
  settings = builders.distill_settings(config)
  views = builders.augment_views(config, "student")
  steps = {
      "grouped": steps_lib.make_student_step(model, tx, settings, views,
                                             student_forward="grouped"),
      "double": steps_lib.make_student_step(model, tx, settings, views, double_bn_update=True,
                                            student_forward="grouped"),
      "released": released_double_update_step(model, tx, settings, views)}
  compiled = {name: jax.jit(step).lower(state, teacher, batch).compile()
              for name, step in steps.items()}
  return {name: (fn, fn(state, teacher, batch)) for name, fn in compiled.items()}


@pytest.mark.slow
def test_student_step_double_bn_update_matches_released_step_without_its_cost(student_steps):
  (_, (single_state, single)), (_, (double_state, double)), (_, (released_state, released)) = (
      student_steps[name] for name in ("grouped", "double", "released"))
  # Different programs compute the batch statistics: agreement to float32 rounding of the
  # statistics (about 1e-6 of their size here); the closed form alone is checked to 1e-6 above.
  assert largest_difference(released_state.batch_stats, double_state.batch_stats) < 1e-5
  assert largest_difference(single_state.batch_stats, double_state.batch_stats) > 1e-3
  np.testing.assert_allclose(double["loss"], released["loss"], rtol=1e-5)
  np.testing.assert_allclose(single["loss"], double["loss"], rtol=1e-6)
  flops = {name: student_steps[name][0].cost_analysis()["flops"]
           for name in ("grouped", "double", "released")}
  # No forward pass added (a few elementwise operations on the running averages) ...
  assert flops["double"] < 1.0001 * flops["grouped"]
  # ... where the released form adds two; XLA merges most of them with the forward pass that
  # is differentiated (same operations on the same operands), not all.
  assert flops["released"] > 1.01 * flops["grouped"]


def test_student_step_refuses_an_unknown_forward():
  config = config_lib.load_config("configs/demo.py", {"model.width": 4}, validate_config=False)
  model = builders.model_from_config(config)
  tx = builders.make_student_optimizer(config)
  with pytest.raises(ValueError, match="student_forward must be one of"):
    steps_lib.make_student_step(model, tx, builders.distill_settings(config),
                                builders.augment_views(config, "student"),
                                student_forward="one_call")
