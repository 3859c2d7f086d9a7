"""dakd-jax: DAKD self-distillation for visible-infrared person re-identification in JAX/Flax.

The public API:
- `load_config(path, overrides)` gives a notebook exactly what `run.py --config=...` gives the
  command line; `validate(config)` checks it; `run_stages(config, workdir)` runs the stages it
  names (pretrain, teacher, student, eval, extract) into a workdir.
- `Extractor.from_checkpoint(path)` turns a trained checkpoint into
  `extractor(images_or_paths, modality) -> [n, D]` unit embeddings.
- Array-level building blocks: `rank_metrics` (CMC, mAP, mINP), `kd_divergence` and
  `confidence_mask` (the DAKD loss primitives).
- `UserError` and its subclasses: the mistakes a user can make (`dakd_jax.errors`).
Heavy modules (JAX, TFDS, Grain) are imported on first use, so `import dakd_jax` stays cheap.
"""
import os

from dakd_jax.config import load_config
from dakd_jax.config import validate
from dakd_jax.errors import CheckpointError
from dakd_jax.errors import ConfigError
from dakd_jax.errors import DatasetError
from dakd_jax.errors import UserError
from dakd_jax.errors import WeightsError

__version__ = "0.1.0"
# Public name -> module that defines it, imported on first access.
_LAZY = {"Extractor": "dakd_jax.evaluation.extractor", "rank_metrics": "dakd_jax.evaluation.metrics",
         "kd_divergence": "dakd_jax.losses.distill", "confidence_mask": "dakd_jax.losses.distill"}


def run_stages(config, workdir):
  """Runs the stages config.stage names into `workdir` (see dakd_jax.cli.run_stages).

  Mark absl flags parsed first in a notebook (`absl.flags.FLAGS.mark_as_parsed()`): Grain reads
  them.
  """
  from dakd_jax import cli  # Deferred: pulls in JAX, TFDS and Grain.
  validate(config)
  return cli.start(config, os.path.abspath(workdir))


def __getattr__(name):
  if name in _LAZY:
    import importlib  # Only for the lazy names.
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'dakd_jax' has no attribute {name!r}")


__all__ = ["CheckpointError", "ConfigError", "DatasetError", "Extractor", "UserError",
           "WeightsError", "confidence_mask", "kd_divergence", "load_config", "rank_metrics",
           "run_stages", "validate", "__version__"]
