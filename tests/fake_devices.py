"""Test scripts in a child Python with N fake CPU devices.

XLA reads `--xla_force_host_platform_device_count` only when JAX starts, so a test that needs
several devices (or a second process) runs its script in a fresh interpreter with this
environment; the parent keeps its single device.
"""
import os
import subprocess
import sys
import textwrap

from tests import xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(device_count: int) -> dict:
  """This process's environment plus `device_count` CPU devices and the repository on the path."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags.with_device_count(device_count)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_child(script: str, device_count: int, *args: str, timeout: float = 60.0) -> str:
  """Runs the (dedented) script with `args` as sys.argv[1:]; asserts it succeeded and returns
  its standard output."""
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          env=child_env(device_count),
                          capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr[-3000:]}"
  return result.stdout
