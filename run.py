"""Command-line entry point: parse flags, load the config, hand over to dakd_jax.cli.

  python run.py --config=configs/demo.py --workdir=workdirs/demo
  python run.py --config=configs/sysu.py --config.mask_threshold=0.8
  python run.py --config=configs/regdb.py:trial=3 --config.stage=eval
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/sysu.py (optionally :arg).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (checkpoints, logs, tables); default workdirs/<config name>.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Validate and print the resolved config as JSON, then exit.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: host:port of process 0 (jax.distributed); omit for one process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id.")
flags.mark_flags_as_required(["config"])
# Library warnings that are expected in every run and say nothing actionable: Orbax on periodic
# saves between evaluations (no metric to rank them by) and on read-only managers (restoring a
# teacher or a best checkpoint), TFDS on our own builder configs. --verbosity shows them again.
EXPECTED_WARNINGS = ("Requested `tracked_metric`; did not provide metrics",
                     "CheckpointManagerOptions.read_only=True", "Given directory is read only",
                     "Using custom data configuration: ReidConfig", "has no dataset_info.json")


def parse_flags(argv):
  """absl flag parsing, with config-override mistakes reported in one line instead of a trace."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    message = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
    if isinstance(error, (AttributeError, KeyError)):  # ml_collections quotes its whole message.
      message = "unknown config field '" + message.strip("'\"").replace("' Did", "'. Did")
    print(f"dakd_jax: invalid config override: {message} (see configs/base.py for every field)",
          file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax, TFDS and JAX log much at INFO; --verbosity=0 brings it back.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(
        lambda record: not any(text in record.getMessage() for text in EXPECTED_WARNINGS))
  from dakd_jax import cli  # Imported after flag parsing: Grain reads absl flags.
  if _COORDINATOR.value:
    cli.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  return cli.main(_CONFIG.value, _WORKDIR.value, config_path=config_path,
                  print_only=_PRINT_CONFIG.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
