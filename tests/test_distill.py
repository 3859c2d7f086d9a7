"""Tests of dakd_jax.losses.distill against a float64 NumPy re-statement of method.md section 4."""
import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax.losses import distill
from dakd_jax.losses.distill import (PAPER_DISTILL, RELEASED_DISTILL, DistillSettings,
                                     confidence_mask, dakd_loss, kd_divergence,
                                     standardize_logits)
from tests.fake_devices import run_child
from tests.numpy_reference import np_log_softmax, numeric_grad


def np_standardize(row):
  row = np.asarray(row, np.float64)
  return (row - row.mean()) / (1e-7 + row.std(ddof=1))


def np_kd(student, teacher, temperature, standardize):
  """k_T per row: T^2 KL(softmax(zs(b)/T) || softmax(zs(a)/T)), one row at a time."""
  out = np.zeros(len(student))
  for k in range(len(student)):
    a, b = np.asarray(student[k], np.float64), np.asarray(teacher[k], np.float64)
    if standardize:
      a, b = np_standardize(a), np_standardize(b)
    log_q, log_p = np_log_softmax(a / temperature), np_log_softmax(b / temperature)
    out[k] = temperature**2 * np.sum(np.exp(log_p) * (log_p - log_q))
  return out


def np_confidences(logits):
  return np.array([np.exp(np_log_softmax(np.asarray(row, np.float64))).max() for row in logits])


def np_mask(logits, threshold, keep):
  confidence = np_confidences(logits)
  cut = np.percentile(confidence, 100 * threshold)
  return confidence <= cut if keep == "low" else confidence > cut


def np_dakd_loss(s_v, s_i, t_v, t_i, centres_v, centres_i, settings):
  """method.md 4.2-4.6 written out term by term, for the default temperature set."""
  assert settings.temperatures == (4, 3, 5, 2, 6)
  s_v, s_i, t_v, t_i, centres_v, centres_i = (
      np.asarray(x, np.float64) for x in (s_v, s_i, t_v, t_i, centres_v, centres_i))
  tau = settings.centre_temperature
  kd = lambda a, b, t: np_kd(a, b, t, settings.logit_standardize)

  def apply_mask(per_sample, mask):
    if settings.mask_mode == "scale":
      return per_sample.mean() * mask.mean()
    return np.sum(per_sample * mask) / len(per_sample)

  def level(a_v, a_i, b_v, b_i, mask):
    weak = 0.9 * sum(apply_mask(kd(a_i, b_i, t), mask) for t in (4, 3, 5, 2, 6))
    if settings.strong_uses_weak_at_2_6:
      strong = 0.9 * (sum(kd(a_v, b_v, t).mean() for t in (4, 3, 5))
                      + sum(kd(a_i, b_i, t).mean() for t in (2, 6)))
    else:
      strong = 0.9 * sum(kd(a_v, b_v, t).mean() for t in (4, 3, 5, 2, 6))
    return weak + strong

  c_s_v, c_s_i = s_v @ centres_v.T / tau, s_i @ centres_i.T / tau
  c_t_v, c_t_i = t_v @ centres_v.T / tau, t_i @ centres_i.T / tau
  mask_instance = np_mask(t_i, settings.mask_threshold, settings.mask_keep)
  mask_class = np_mask(c_t_i, settings.mask_threshold, settings.mask_keep)
  instance = 0.5 * level(s_v, s_i, t_v, t_i, mask_instance)
  class_level = 0.5 * level(c_s_v, c_s_i, c_t_v, c_t_i, mask_class)
  plain_kd = 1.0 * 0.9 * (kd(s_v, t_v, 4).mean() + kd(s_i, t_i, 4).mean())
  return {"only_kd": plain_kd, "mlkd_no_instance": class_level, "mlkd_no_class": instance,
          "full_mlkd": instance + class_level}[settings.ablation]


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(seed, n=6, dim=32, num_classes=7):
  """Student features (unnormalised), teacher unit features and unit centres, float32."""
  rng = np.random.default_rng(seed)
  s_v, s_i = 3.0 * rng.normal(size=(2, n, dim))
  t_v, t_i = unit(rng.normal(size=(2, n, dim)))
  centres_v, centres_i = unit(rng.normal(size=(2, num_classes, dim)))
  batch = [np.asarray(x, np.float32) for x in (s_v, s_i, t_v, t_i, centres_v, centres_i)]
  # The masks are compared with float64 NumPy: keep the teacher's confidences well apart so
  # float32 rounding cannot reorder them.
  for logits in (batch[3], batch[3].astype(np.float64) @ batch[5].T / 0.05):
    assert np.min(np.diff(np.sort(np_confidences(logits)))) > 1e-5
  return batch


def test_standardize_logits_matches_numpy():
  x = np.random.default_rng(0).normal(size=(5, 9)).astype(np.float32) * 4 + 2
  expected = np.stack([np_standardize(row) for row in x])
  np.testing.assert_allclose(standardize_logits(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("standardize", [True, False])
def test_kd_divergence_values_and_gradient(standardize):
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(2, 4, 7)) * 2
  for temperature in (1.0, 2.0, 4.0, 6.0):
    got = kd_divergence(jnp.float32(student), jnp.float32(teacher), temperature,
                        standardize=standardize)
    assert got.dtype == jnp.float32 and got.shape == (4,)
    np.testing.assert_allclose(got, np_kd(student, teacher, temperature, standardize),
                               rtol=1e-4, atol=1e-6)
  # A tuple of temperatures gives one row of per-sample terms per temperature.
  several = kd_divergence(jnp.float32(student), jnp.float32(teacher), (4, 2.5),
                          standardize=standardize)
  assert several.shape == (2, 4)
  for row, temperature in zip(several, (4, 2.5)):
    np.testing.assert_allclose(row, np_kd(student, teacher, temperature, standardize),
                               rtol=1e-4, atol=1e-6)
  grad = jax.grad(lambda a: jnp.sum(kd_divergence(a, jnp.float32(teacher), 3.0,
                                                  standardize=standardize)))(
                                                      jnp.float32(student))
  expected = numeric_grad(lambda a: np_kd(a, teacher, 3.0, standardize).sum(), student)
  np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


def test_kd_divergence_computes_in_float32_for_bfloat16_inputs():
  rng = np.random.default_rng(2)
  student, teacher = (jnp.asarray(x, jnp.bfloat16) for x in rng.normal(size=(2, 3, 16)))
  got = kd_divergence(student, teacher, 4.0, standardize=True)
  assert got.dtype == jnp.float32
  expected = np_kd(np.asarray(student, np.float64), np.asarray(teacher, np.float64), 4.0, True)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_kd_between_identical_logits_is_zero_at_every_temperature():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(5, 12)) * 3, jnp.float32)
  for temperature in (4, 3, 5, 2, 6, 1, 0.5):
    for standardize in (True, False):
      np.testing.assert_allclose(kd_divergence(logits, logits, temperature,
                                               standardize=standardize), 0.0, atol=1e-5)


def test_standardised_kd_is_invariant_to_positive_rescaling_and_shift():
  rng = np.random.default_rng(4)
  student, teacher = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, 4, 10)))
  reference = kd_divergence(student, teacher, 4.0, standardize=True)
  assert np.all(np.asarray(reference) > 1e-3)
  for a, b in ((student * 7.5 + 3.0, teacher), (student, teacher * 0.05 - 2.0),
               (student * 20.0, teacher / 0.05 + 1.0)):
    np.testing.assert_allclose(kd_divergence(a, b, 4.0, standardize=True), reference,
                               rtol=2e-4)
  # Without standardisation the same rescaling changes the value: the test above can fail.
  assert not np.allclose(kd_divergence(student * 7.5, teacher, 4.0, standardize=False),
                         kd_divergence(student, teacher, 4.0, standardize=False), rtol=1e-2)


def confidence_logits(rng, n, num_ties):
  """Two-entry logit rows [0, x]: confidence sigmoid(|x|); `num_ties` rows repeat earlier ones."""
  gaps = rng.permutation(n)[:n] * 0.25 + 0.1
  logits = np.stack([np.zeros(n), gaps], axis=1)
  for k in range(min(num_ties, n - 1)):
    logits[n - 1 - k] = logits[rng.integers(0, n - 1 - k)]
  return np.asarray(logits, np.float32)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 32, 33, 40])
def test_confidence_mask_matches_numpy_percentile(n):
  rng = np.random.default_rng(n)
  for num_ties in (0, n // 3, n - 1):
    logits = confidence_logits(rng, n, num_ties)
    for threshold in (0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0):
      for keep in ("low", "high"):
        got = confidence_mask(jnp.asarray(logits), threshold, keep)
        assert got.dtype == jnp.bool_
        np.testing.assert_array_equal(got, np_mask(logits, threshold, keep),
                                      err_msg=f"n={n} ties={num_ties} q={threshold} {keep}")


def test_confidence_mask_keeps_ties_at_the_cut_on_the_low_side():
  # Confidences (sigmoid of the gaps) in order: a, b, b, b, c -> median b; low keeps all b's.
  logits = np.array([[0, 0.1], [0, 1.0], [0, 1.0], [0, 1.0], [0, 2.0]], np.float32)
  np.testing.assert_array_equal(confidence_mask(jnp.asarray(logits), 0.5, "low"),
                                [True, True, True, True, False])
  np.testing.assert_array_equal(confidence_mask(jnp.asarray(logits), 0.5, "high"),
                                [False, False, False, False, True])


def test_released_mask_keeps_exactly_half_of_an_even_batch():
  rng = np.random.default_rng(5)
  for n in (2, 8, 32, 40):
    logits = jnp.asarray(rng.normal(size=(n, 64)) * 2, jnp.float32)
    mask = np.asarray(jax.jit(confidence_mask, static_argnums=(1, 2))(logits, 0.5, "low"))
    assert mask.sum() == n // 2
    confidence = np_confidences(logits)
    assert confidence[mask].max() < confidence[~mask].min()


def test_confidence_mask_rejects_bad_arguments():
  logits = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="keep"):
    confidence_mask(logits, 0.5, "middle")
  with pytest.raises(ValueError, match="threshold"):
    confidence_mask(logits, 1.5, "low")


ALL_SETTINGS = [dataclasses.replace(base, ablation=ablation)
                for base in (RELEASED_DISTILL, PAPER_DISTILL) for ablation in distill.ABLATIONS]


@pytest.mark.parametrize("settings", ALL_SETTINGS,
                         ids=[f"{s.mask_mode}-{s.ablation}" for s in ALL_SETTINGS])
def test_dakd_loss_matches_numpy(settings):
  batch = make_batch(seed=6)
  loss, terms = dakd_loss(*(jnp.asarray(x) for x in batch), settings)
  np.testing.assert_allclose(loss, np_dakd_loss(*batch, settings), rtol=1e-4)
  mask = np_mask(batch[3], 0.5, settings.mask_keep)
  np.testing.assert_allclose(terms["mask_fraction_instance"], mask.mean())


def test_dakd_loss_without_standardisation_and_mixed_variant():
  settings = dataclasses.replace(RELEASED_DISTILL, logit_standardize=False, mask_keep="high",
                                 mask_mode="select", mask_threshold=0.3)
  batch = make_batch(seed=7, n=7)
  loss, _ = dakd_loss(*(jnp.asarray(x) for x in batch), settings)
  np.testing.assert_allclose(loss, np_dakd_loss(*batch, settings), rtol=1e-4)


@pytest.mark.parametrize("settings", [RELEASED_DISTILL, PAPER_DISTILL], ids=["released", "paper"])
def test_dakd_loss_gradients(settings):
  batch = make_batch(seed=8, n=4, dim=6, num_classes=5)
  s_v, s_i, t_v, t_i, centres_v, centres_i = (jnp.asarray(x) for x in batch)
  fn = lambda *args: dakd_loss(*args, settings)[0]
  grads = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3, 4, 5)))(s_v, s_i, t_v, t_i, centres_v,
                                                            centres_i)
  expected_v = numeric_grad(lambda x: np_dakd_loss(x, *batch[1:], settings),
                            batch[0].astype(np.float64))
  expected_i = numeric_grad(lambda x: np_dakd_loss(batch[0], x, *batch[2:], settings),
                            batch[1].astype(np.float64))
  np.testing.assert_allclose(grads[0], expected_v, rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(grads[1], expected_i, rtol=2e-3, atol=2e-5)
  assert np.abs(expected_v).max() > 1e-3 and np.abs(expected_i).max() > 1e-3
  for teacher_grad in grads[2:]:  # teacher features and centres are stop-gradient
    np.testing.assert_array_equal(teacher_grad, 0.0)


def test_released_effective_weights():
  """method.md 4.5: with m = 0.5 the released full loss is a fixed mix of batch KD terms."""
  batch = make_batch(seed=9, n=8)
  s_v, s_i, t_v, t_i, centres_v, centres_i = (np.asarray(x, np.float64) for x in batch)
  loss, terms = dakd_loss(*(jnp.asarray(x) for x in batch), RELEASED_DISTILL)
  assert float(terms["mask_fraction_instance"]) == 0.5
  assert float(terms["mask_fraction_class"]) == 0.5
  expected = 0.0
  for a_v, a_i, b_v, b_i in ((s_v, s_i, t_v, t_i),
                             (s_v @ centres_v.T, s_i @ centres_i.T,
                              t_v @ centres_v.T, t_i @ centres_i.T)):
    big_k = lambda a, b, t: np_kd(a, b, t, True).mean()
    expected += sum(0.45 * big_k(a_v, b_v, t) + 0.225 * big_k(a_i, b_i, t) for t in (4, 3, 5))
    expected += sum(0.675 * big_k(a_i, b_i, t) for t in (2, 6))
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_dakd_loss_terms_are_consistent():
  batch = make_batch(seed=10)
  _, terms = dakd_loss(*(jnp.asarray(x) for x in batch), PAPER_DISTILL)
  np.testing.assert_allclose(terms["instance"],
                             0.5 * (terms["instance_weak"] + terms["instance_strong"]), rtol=1e-6)
  np.testing.assert_allclose(terms["class"],
                             0.5 * (terms["class_weak"] + terms["class_strong"]), rtol=1e-6)
  full, _ = dakd_loss(*(jnp.asarray(x) for x in batch), PAPER_DISTILL)
  np.testing.assert_allclose(full, terms["instance"] + terms["class"], rtol=1e-6)


def test_settings_constants_validation_and_hashing():
  assert (RELEASED_DISTILL.mask_keep, RELEASED_DISTILL.mask_mode,
          RELEASED_DISTILL.strong_uses_weak_at_2_6) == ("low", "scale", True)
  assert (PAPER_DISTILL.mask_keep, PAPER_DISTILL.mask_mode,
          PAPER_DISTILL.strong_uses_weak_at_2_6) == ("high", "select", False)
  assert RELEASED_DISTILL.temperatures == (4, 3, 5, 2, 6)
  assert DistillSettings(temperatures=[4, 3]).temperatures == (4, 3)
  assert hash(DistillSettings()) == hash(DistillSettings())
  for field, value in (("mask_keep", "middle"), ("mask_mode", "both"), ("ablation", "kd"),
                       ("temperatures", ()), ("temperatures", (4, -1)), ("kd_weight", -0.1),
                       ("centre_temperature", 0.0), ("mask_threshold", 1.2),
                       ("logit_standardize", 1), ("strong_uses_weak_at_2_6", "yes")):
    with pytest.raises(ValueError, match=field):
      DistillSettings(**{field: value})
  # Settings are static under jit: equal settings share one compilation.
  batch = [jnp.asarray(x) for x in make_batch(seed=11)]
  traces = []

  def loss_fn(*args, settings):
    traces.append(1)
    return dakd_loss(*args, settings)[0]

  jitted = jax.jit(loss_fn, static_argnames="settings")
  jitted(*batch, settings=DistillSettings())
  jitted(*batch, settings=DistillSettings())
  assert len(traces) == 1


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from dakd_jax.losses.distill import PAPER_DISTILL, RELEASED_DISTILL, confidence_mask, \\
        dakd_loss, kd_divergence

    rng = np.random.default_rng(0)
    n, dim, classes = 8, 32, 6
    features = [jnp.asarray(x, jnp.float32) for x in rng.normal(size=(4, n, dim))]
    centres = [jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, classes, dim)) / 6]

    def everything(s_v, s_i, t_v, t_i, c_v, c_i):
      out = {"kd": kd_divergence(s_v, t_v, 4.0, standardize=True),
             "mask": confidence_mask(t_i, 0.5, "low")}
      for name, settings in (("released", RELEASED_DISTILL), ("paper", PAPER_DISTILL)):
        fn = lambda a, b: dakd_loss(a, b, t_v, t_i, c_v, c_i, settings)
        out[name] = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(s_v, s_i)
      return out

    step = jax.jit(everything)
    reference = step(*features, *centres)
    assert 0 < int(reference["mask"].sum()) < n
    for axis_type in (AxisType.Explicit, AxisType.Auto):
      mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
      rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
      with jax.set_mesh(mesh):
        sharded = step(*[jax.device_put(x, rows) for x in features],
                       *[jax.device_put(x, replicated) for x in centres])
      assert len(sharded["paper"][1][0].sharding.device_set) == 4
      for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    print("SHARDED_OK")
    """)


def test_sharded_over_four_devices_matches_unsharded():
  assert "SHARDED_OK" in run_child(SHARDED_SCRIPT, 4, timeout=300)
