"""Command-line entry point: parse flags, load the config, hand over to dakd_jax.cli.

  python run.py --config=configs/demo.py --workdir=workdirs/demo
  python run.py --config=configs/sysu.py --config.mask_threshold=0.8
  python run.py --config=configs/regdb.py:trial=3 --config.stage=eval

The `--config` arguments go to `dakd_jax.config.config_from_args`, the same parser a notebook's
`load_config` uses; absl parses the rest.
"""
import os
import sys
import warnings

from absl import app
from absl import flags
from absl import logging

from dakd_jax import config as config_lib
from dakd_jax import errors
from dakd_jax import host_allocator

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (checkpoints, logs, tables); default workdirs/<config name>.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Validate and print the resolved config as JSON, then exit.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: host:port of process 0 (jax.distributed); omit for one process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id.")
# Library warnings that are expected in every run and say nothing actionable: Orbax on read-only
# managers (restoring a teacher or a best checkpoint), TFDS on our own builder configs.
# --verbosity shows them again.
EXPECTED_WARNINGS = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
                     "Using custom data configuration", "has no dataset_info.json")
USAGE = ("usage: python run.py --config=configs/<name>.py[:arg] [--config.<field>=<value> ...] "
         "[--workdir=DIR] [--print_config]")


def parse_flags(argv):
  """absl flag parsing; a mistake ends in one line on stderr, not a trace."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"dakd_jax: {error}\n{USAGE}", file=sys.stderr)
    sys.exit(2)


def is_shown(record) -> bool:
  """Whether a library log record reaches the terminal without --verbosity: not an expected
  warning, and not a library's logged copy of a failure with its traceback (Orbax's failed
  save, asyncio's unretrieved write errors after it): the failure itself ends the run in one
  line."""
  if any(text in record.getMessage() for text in EXPECTED_WARNINGS):
    return False
  if not record.exc_info or record.exc_info[1] is None:
    return True
  return not (f"{os.sep}orbax{os.sep}" in record.pathname
              or errors.storage_error(record.exc_info[1], "") is not None)


# After a failed checkpoint save, Orbax's write coroutines that never started are collected
# (possibly at exit) with a RuntimeWarning printed after the run's one error line.
UNAWAITED_ORBAX_WRITES = r"coroutine '.*write_fragment' was never awaited"


def hide_library_noise() -> None:
  """Without --verbosity: library logs at WARNING and above, less the expected warnings and
  the logged copies of a failure; no warning for Orbax writes a failed save left unstarted."""
  # Orbax, TFDS and JAX log much at INFO; --verbosity=0 brings it back.
  logging.set_verbosity(logging.WARNING)
  # On the handler: it also prints what other libraries log through Python's root logger.
  logging.get_absl_handler().addFilter(is_shown)
  # Process-wide and kept: the coroutines may be collected after main returns.
  warnings.filterwarnings("ignore", message=UNAWAITED_ORBAX_WRITES, category=RuntimeWarning)


def main(argv, config_args):
  if len(argv) > 1:
    print(f"dakd_jax: unexpected arguments {argv[1:]}\n{USAGE}", file=sys.stderr)
    return 2
  if not flags.FLAGS["verbosity"].present:
    hide_library_noise()
  # Freed buffers kept for the next step (the same numbers; the demo 6% quicker).
  host_allocator.keep_freed_memory()
  from dakd_jax import cli  # Imported after flag parsing: Grain reads absl flags.
  return cli.main_from_args(
      config_args, _WORKDIR.value, print_only=_PRINT_CONFIG.value,
      distributed=(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value),
      verbose=flags.FLAGS["verbosity"].present)


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def print_help() -> None:
  """--help, with or without --config: the usage, the configs and this program's flags."""
  configs = sorted(name for name in os.listdir(os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "configs")) if name.endswith(".py") and name != "__init__.py")
  print(f"{USAGE}\n\nconfigs: {', '.join(f'configs/{name}' for name in configs)} "
        "(configs/base.py lists every field with its default and units; --print_config shows "
        "the resolved config)\n\nflags:")
  print(flags.FLAGS.module_help(sys.modules[__name__]))


if __name__ == "__main__":
  CONFIG_ARGS, OTHER_ARGS = config_lib.split_argv(sys.argv)
  if any(arg in HELP_FLAGS for arg in OTHER_ARGS[1:]):
    print_help()
    sys.exit(0)
  if not CONFIG_ARGS:
    print(f"dakd_jax: --config is required\n{USAGE}", file=sys.stderr)
    sys.exit(2)
  app.run(lambda argv: main(argv, CONFIG_ARGS), argv=OTHER_ARGS, flags_parser=parse_flags)
