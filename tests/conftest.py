"""Shared pytest setup.

Grain reads absl flags at import/use time and raises UnparsedFlagAccessError unless they are
parsed; pytest never calls absl.app.run, so mark them parsed here (also in worker processes,
which import this module again).
"""
import os
import sys

from absl import flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
