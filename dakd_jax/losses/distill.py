"""DAKD student loss: instance- and class-level KD with logit standardisation and masks.

Stage 2 of the method (method.md section 4). The student step runs the student on the visible
("strong") and infrared ("weak") views, the frozen teacher on the same tensors, and calls
`dakd_loss` with both networks' BNNeck outputs and the teacher's fixed class centres. Everything
here is a pure function of arrays; `DistillSettings` is hashable so it can be static under jit.
The released-code and paper behaviours differ in three places (method.md 4.4, 4.5, section 10);
both are settings, see `RELEASED_DISTILL` and `PAPER_DISTILL`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dakd_jax.errors import Bounds, SettingError, check_bounds
from dakd_jax.sharding import gather_rows

ABLATIONS = ("only_kd", "mlkd_no_instance", "mlkd_no_class", "full_mlkd")
MASK_KEEP = ("low", "high")
MASK_MODES = ("scale", "select")
# The temperatures whose "strong" KD term the released code takes from the infrared branch.
_WEAK_QUIRK_TEMPERATURES = (2, 6)


def standardize_logits(x: jax.Array) -> jax.Array:
  """Z-scores each row: `(x - mean(x)) / (1e-7 + std(x))`, std unbiased (N-1) (method.md 4.3).

  Args:
    x: [..., N] logits, N >= 2.
  Returns:
    float32 [..., N].
  """
  x = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  std = jnp.std(x, axis=-1, keepdims=True, ddof=1)
  return (x - mean) / (1e-7 + std)


def kd_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature, *,
                  standardize: bool) -> jax.Array:
  """Per-sample KD term `k_T(a, b) = T^2 KL(softmax(b/T) || softmax(a/T))` (method.md 4.3).

  With `standardize`, both rows are first z-scored (`standardize_logits`), once for all
  temperatures. Computed in float32 whatever the input dtype. Gradients flow into both
  arguments; callers that distil from a frozen teacher stop the teacher's gradient themselves
  (`dakd_loss` does).

  Args:
    student_logits: [n, N] logits `a`, any float dtype.
    teacher_logits: [n, N] logits `b`.
    temperature: T > 0, a number or scalar array; or a tuple / 1-D array of K temperatures.
    standardize: z-score each row first.
  Returns:
    float32 [n] (scalar temperature) or [K, n]: the KL summed over the N entries of each row,
    times T^2.
  Raises:
    ValueError: if the two shapes differ.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"kd_divergence: student_logits shape {student_logits.shape} != "
                     f"teacher_logits shape {teacher_logits.shape}")
  student = jnp.asarray(student_logits, jnp.float32)
  teacher = jnp.asarray(teacher_logits, jnp.float32)
  if standardize:
    student, teacher = standardize_logits(student), standardize_logits(teacher)
  temperatures = jnp.asarray(temperature, jnp.float32)
  is_scalar = temperatures.ndim == 0
  temperatures = jnp.reshape(temperatures, (-1, 1, 1))  # [K, 1, 1] against [n, N] rows
  log_p_student = jax.nn.log_softmax(student / temperatures, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher / temperatures, axis=-1)
  # p * (log p - log q) with p from log_softmax: an underflowed p gives 0 * finite = 0.
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  kl = kl * temperatures[:, :, 0]**2
  return kl[0] if is_scalar else kl


def confidence_mask(teacher_logits: jax.Array, threshold: float, keep: str) -> jax.Array:
  """Selects the less (or more) confident half of a batch (method.md 4.4).

  Confidence `q_k = max softmax(teacher_logits[k])` (temperature 1, no standardisation).
  `cut` = the `threshold` quantile of the batch's `q` with linear interpolation (NumPy's default
  percentile rule). keep="low" keeps `q <= cut` (released code), keep="high" keeps `q > cut`.

  The cut lies in `[q_(j), q_(j+1))`, `j = floor(threshold (n-1))` (0-based order statistics,
  the index computed in float64 as NumPy does), and no confidence lies strictly between them,
  so `q <= cut` holds exactly when `q <= q_(j)`, i.e. when at most `j` confidences are strictly
  smaller than `q`. The mask is computed from those counts, so it never depends on how the
  interpolated cut rounds (the median of an even batch keeps exactly half of distinct values).
  The one difference from `q <= numpy.quantile(q, threshold)`: when `threshold (n-1)` rounds
  to a few ulps below an integer (e.g. 0.29 of 101 rows), NumPy's float64 interpolation can
  land exactly on `q_(j+1)` and keep it; here it is not kept. The whole (global) batch is
  compared, so a batch sharded over devices gives the same mask as an unsharded one.

  Args:
    teacher_logits: [n, N] logits, any float dtype.
    threshold: quantile in [0, 1], a Python number (static).
    keep: "low" or "high".
  Returns:
    bool [n], no gradient.
  Raises:
    ValueError: for a threshold outside [0, 1], an unknown `keep` or logits that are not 2-D.
  """
  if keep not in MASK_KEEP:
    raise ValueError(f"confidence_mask: keep must be one of {MASK_KEEP}, got {keep!r}")
  if not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
    raise ValueError(f"confidence_mask: threshold must be a number in [0, 1], got {threshold!r}")
  if teacher_logits.ndim != 2:
    raise ValueError(f"confidence_mask: teacher_logits must be [n, N], got shape "
                     f"{teacher_logits.shape}")
  logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
  order_index = math.floor(float(threshold) * (confidence.shape[0] - 1))
  everyone = gather_rows(confidence)
  num_smaller = jnp.sum(everyone[None, :] < confidence[:, None], axis=1)
  is_low = num_smaller <= order_index
  return is_low if keep == "low" else jnp.logical_not(is_low)


POSITIVE = Bounds(0.0, low_inclusive=False)
DISTILL_BOUNDS = {"kd_weight": Bounds(0.0), "instance_weight": Bounds(0.0),
                  "class_weight": Bounds(0.0), "plain_kd_weight": Bounds(0.0),
                  "centre_temperature": POSITIVE,
                  "mask_threshold": Bounds(0.0, 1.0)}  # a quantile of the confidences


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """Static settings of the DAKD student loss (method.md 4 and 10; defaults = released values).

  temperatures: KD temperatures; the first is the base one used by plain KD (4).
  kd_weight: factor on every KD term (0.9).
  instance_weight / class_weight: factors on the instance and class losses (0.5 / 0.5).
  plain_kd_weight: factor on the plain KD loss of the `only_kd` ablation (1.0).
  centre_temperature: class logits are `features @ centres.T / centre_temperature` (0.05).
  logit_standardize: z-score logit rows inside every KD term.
  mask_threshold: the confidence quantile of the masks (0.5, the median).
  mask_keep: "low" (released) keeps the less confident rows, "high" (paper) the more confident.
  mask_mode: "scale" (released) multiplies the batch-mean KD by the kept fraction, "select"
    (paper) averages `mask_k * k_T` over the n rows.
  strong_uses_weak_at_2_6: released quirk, the T=2 and T=6 terms of the "strong" sums use the
    infrared branch instead of the visible one.
  ablation: one of `ABLATIONS` (method.md 4.6).
  """
  temperatures: tuple = (4, 3, 5, 2, 6)
  kd_weight: float = 0.9
  instance_weight: float = 0.5
  class_weight: float = 0.5
  plain_kd_weight: float = 1.0
  centre_temperature: float = 0.05
  logit_standardize: bool = True
  mask_threshold: float = 0.5
  mask_keep: str = "low"
  mask_mode: str = "scale"
  strong_uses_weak_at_2_6: bool = True
  ablation: str = "full_mlkd"

  def __post_init__(self):
    # Config systems hand over lists; a tuple keeps the settings hashable.
    if isinstance(self.temperatures, list):
      object.__setattr__(self, "temperatures", tuple(self.temperatures))
    if (not isinstance(self.temperatures, tuple) or not self.temperatures
        or not all(POSITIVE.holds(t) for t in self.temperatures)):
      raise SettingError("DistillSettings", "temperatures", self.temperatures,
                         "a non-empty tuple of numbers > 0")
    # The one declaration of these bounds: start-up builds the settings and names the config
    # field of a refused value (builders.distill_settings).
    for name, bounds in DISTILL_BOUNDS.items():
      check_bounds("DistillSettings", name, getattr(self, name), bounds)
    for name, allowed in (("mask_keep", MASK_KEEP), ("mask_mode", MASK_MODES),
                          ("ablation", ABLATIONS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"DistillSettings.{name} must be one of {allowed}, got "
                         f"{getattr(self, name)!r}")
    for name in ("logit_standardize", "strong_uses_weak_at_2_6"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"DistillSettings.{name} must be True or False, got "
                         f"{getattr(self, name)!r}")


RELEASED_DISTILL = DistillSettings(mask_keep="low", mask_mode="scale",
                                   strong_uses_weak_at_2_6=True)
PAPER_DISTILL = DistillSettings(mask_keep="high", mask_mode="select",
                                strong_uses_weak_at_2_6=False)


def _level_sums(student_visible, student_infrared, teacher_visible, teacher_infrared, mask,
                settings: DistillSettings) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weak sum, strong sum and plain KD of one level (instance or class), method.md 4.4-4.5.

  Returns (w_kd sum_T Mask[K_T(infrared)], w_kd sum_T K_T(strong branch of T),
  K_T0(visible) + K_T0(infrared)), float32 scalars.
  """
  temperatures = settings.temperatures
  kd = lambda a, b: kd_divergence(a, b, temperatures, standardize=settings.logit_standardize)
  weak_per_sample = kd(student_infrared, teacher_infrared)  # [K, n]
  visible_per_sample = kd(student_visible, teacher_visible)  # [K, n]
  weak_batch, visible_batch = jnp.mean(weak_per_sample, 1), jnp.mean(visible_per_sample, 1)
  mask = mask.astype(jnp.float32)
  if settings.mask_mode == "scale":
    # Released: the batch mean is scaled by the kept fraction; every row keeps its gradient.
    weak = jnp.sum(weak_batch) * jnp.mean(mask)
  else:
    weak = jnp.sum(jnp.mean(weak_per_sample * mask[None, :], axis=1))
  # Released quirk (strong_uses_weak_at_2_6): the strong T=2 and T=6 terms use the infrared pair.
  from_weak = np.array([settings.strong_uses_weak_at_2_6 and t in _WEAK_QUIRK_TEMPERATURES
                        for t in temperatures])
  strong = jnp.sum(jnp.where(from_weak, weak_batch, visible_batch))
  plain = visible_batch[0] + weak_batch[0]
  return settings.kd_weight * weak, settings.kd_weight * strong, plain


def _centre_logits(features: jax.Array, centres: jax.Array, temperature: float) -> jax.Array:
  # Full float32 matmul: TF32 on GPUs would perturb the /0.05 logits that feed the class mask.
  return jnp.matmul(features, centres.T, precision=jax.lax.Precision.HIGHEST) / temperature


def dakd_loss(student_visible: jax.Array, student_infrared: jax.Array,
              teacher_visible: jax.Array, teacher_infrared: jax.Array,
              centres_visible: jax.Array, centres_infrared: jax.Array,
              settings: DistillSettings) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """The DAKD student loss (method.md 4.2-4.6).

  Instance logits are the features (`s`, `t`); class logits are `c = features @ C.T / tau_c`,
  each branch against its own modality's centres. With `K_T` the batch mean of `kd_divergence`
  and `Mask[.]` the mask application of `settings.mask_mode`:
    I_weak   = w_kd sum_T Mask[K_T(s_i, t_i)]        (instance mask from t_i)
    I_strong = w_kd sum_T K_T(s_v, t_v)              (T = 2, 6 on the infrared branch when
                                                      `strong_uses_weak_at_2_6`)
    Cl_weak / Cl_strong: the same with class logits  (class mask from c^t_i)
    L_inst = w_inst (I_weak + I_strong),  L_cls = w_cls (Cl_weak + Cl_strong)
    L_kd = w_plain w_kd (K_T0(s_v, t_v) + K_T0(s_i, t_i)), T0 = temperatures[0], unmasked.
  Loss by ablation: only_kd -> L_kd; mlkd_no_instance -> L_cls; mlkd_no_class -> L_inst;
  full_mlkd -> L_inst + L_cls. Teacher features and centres carry no gradient. float32 inside.

  Args:
    student_visible, student_infrared: [n, D] student BNNeck outputs (unnormalised).
    teacher_visible, teacher_infrared: [n, D] teacher unit embeddings of the same images.
    centres_visible, centres_infrared: [C, D] the teacher's fixed class centres.
    settings: a `DistillSettings`.
  Returns:
    (loss, terms): the float32 scalar loss and a dict of float32 scalars for logging:
    instance_weak, instance_strong, instance, class_weak, class_strong, class, plain_kd,
    mask_fraction_instance, mask_fraction_class (all computed whatever the ablation).
  Raises:
    ValueError: on mismatched shapes or settings that are not a `DistillSettings`.
  """
  if not isinstance(settings, DistillSettings):
    raise ValueError(f"dakd_loss: settings must be a DistillSettings, got {type(settings)}")
  features = [student_visible, student_infrared, teacher_visible, teacher_infrared]
  if len({f.shape for f in features}) != 1 or student_visible.ndim != 2:
    raise ValueError("dakd_loss: student and teacher features must all be [n, D] with the same "
                     f"shape, got {[f.shape for f in features]}")
  centres = [centres_visible, centres_infrared]
  if (len({c.shape for c in centres}) != 1 or centres_visible.ndim != 2
      or centres_visible.shape[1] != student_visible.shape[1]):
    raise ValueError("dakd_loss: centres must both be [C, D] with D = feature width "
                     f"{student_visible.shape[1]}, got {[c.shape for c in centres]}")
  s_v, s_i = (jnp.asarray(f, jnp.float32) for f in features[:2])
  t_v, t_i, centres_v, centres_i = (jax.lax.stop_gradient(jnp.asarray(f, jnp.float32))
                                    for f in features[2:] + centres)
  tau = settings.centre_temperature
  c_s_v, c_s_i = _centre_logits(s_v, centres_v, tau), _centre_logits(s_i, centres_i, tau)
  c_t_v, c_t_i = _centre_logits(t_v, centres_v, tau), _centre_logits(t_i, centres_i, tau)

  mask_instance = confidence_mask(t_i, settings.mask_threshold, settings.mask_keep)
  mask_class = confidence_mask(c_t_i, settings.mask_threshold, settings.mask_keep)
  instance_weak, instance_strong, plain_kd = _level_sums(s_v, s_i, t_v, t_i, mask_instance,
                                                        settings)
  class_weak, class_strong, _ = _level_sums(c_s_v, c_s_i, c_t_v, c_t_i, mask_class, settings)
  instance = settings.instance_weight * (instance_weak + instance_strong)
  class_level = settings.class_weight * (class_weak + class_strong)
  # Plain KD (only_kd): instance level, base temperature temperatures[0], unmasked.
  plain_kd = settings.plain_kd_weight * settings.kd_weight * plain_kd
  loss = {"only_kd": plain_kd, "mlkd_no_instance": class_level, "mlkd_no_class": instance,
          "full_mlkd": instance + class_level}[settings.ablation]
  terms = {
      "instance_weak": instance_weak, "instance_strong": instance_strong, "instance": instance,
      "class_weak": class_weak, "class_strong": class_strong, "class": class_level,
      "plain_kd": plain_kd,
      "mask_fraction_instance": jnp.mean(mask_instance.astype(jnp.float32)),
      "mask_fraction_class": jnp.mean(mask_class.astype(jnp.float32)),
  }
  return loss, terms
