"""What produced a number: library versions, the devices, the code's git commit.

Recorded in every eval/results.json and report.md (stage=eval, corrupted evaluations included),
so a score that moves with a library version can be traced (README "Reproducible
environment"). Versions come from the same function as the export manifest's
(`deploy.packages.library_versions`).
"""
from __future__ import annotations

import os
import subprocess

import jax

from dakd_jax.deploy import packages

# PyPI names whose versions can change a number: the numerics, the data path, the pictures'
# and corruptions' libraries.
RECORDED_PACKAGES = ("dakd_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                     "tensorflow-datasets", "array_record", "numpy", "scipy", "pillow",
                     "ml-collections", "imagecorruptions-imaug", "opencv-python",
                     "scikit-image", "numba")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(directory: str = REPOSITORY) -> dict:
  """{'commit': the HEAD commit or None, 'dirty': whether tracked files differ from it (None
  when unknown)} of the git checkout holding `directory` (None outside one, e.g. a wheel)."""
  def git(*arguments: str) -> str | None:
    try:
      result = subprocess.run(["git", "-C", directory, *arguments], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
      return None
    return result.stdout.strip() if result.returncode == 0 else None

  commit = git("rev-parse", "HEAD")
  if commit is None:
    return {"commit": None, "dirty": None}
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_state() -> dict:
  """The devices JAX computes on: platform, kind (e.g. 'NVIDIA H100 80GB HBM3', 'cpu'), global
  and local counts, process count."""
  devices = jax.devices()
  return {"platform": devices[0].platform, "kind": devices[0].device_kind,
          "count": len(devices), "local_count": jax.local_device_count(),
          "process_count": jax.process_count()}


def describe() -> dict:
  """{'libraries': {name: version}, 'devices': device_state(), 'code': git_state()}."""
  return {"libraries": packages.library_versions(RECORDED_PACKAGES),
          "devices": device_state(), "code": git_state()}
