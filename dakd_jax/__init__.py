"""dakd-jax: DAKD self-distillation for visible-infrared person re-identification in JAX/Flax.

The public API: `load_config` gives a notebook what `run.py --config=...` gives the command line;
`run_stages` runs the stages a config names (teacher, student, eval) into a workdir;
`rank_metrics` and `kd_divergence`/`confidence_mask` are the array-level building blocks.
Heavy modules are imported on first use, so `import dakd_jax` stays cheap.
"""
from dakd_jax.config import ConfigError
from dakd_jax.config import load_config
from dakd_jax.config import validate

__version__ = "0.1.0"


def run_stages(config, workdir):
  """Runs the stages config.stage names; see dakd_jax.cli.run_stages."""
  from dakd_jax import cli  # Deferred: pulls in JAX, TFDS and Grain.
  validate(config)
  import os  # Orbax needs an absolute workdir.
  return cli.run_stages(config, os.path.abspath(workdir))


__all__ = ["ConfigError", "load_config", "validate", "run_stages", "__version__"]
