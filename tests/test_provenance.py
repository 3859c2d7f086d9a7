"""What produced a number (dakd_jax/provenance.py): the git commit and its dirty flag against a
repository made in the test, the devices, the library versions, and both in stage=eval's
results.json and report.md (tests/test_robustness.py checks the device count on 1 and 2
devices through run.py)."""
import importlib.metadata
import os
import subprocess

import jax

from dakd_jax import provenance
from dakd_jax.evaluation import report


def git(directory, *arguments):
  return subprocess.run(["git", "-C", str(directory), *arguments], check=True,
                        capture_output=True, text=True).stdout.strip()


def test_git_state_names_the_commit_and_whether_tracked_files_changed(tmp_path):
  assert provenance.git_state(str(tmp_path)) == {"commit": None, "dirty": None}
  git(tmp_path, "init", "-q")
  (tmp_path / "a.txt").write_text("one\n")
  git(tmp_path, "add", "a.txt")
  git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
  commit = git(tmp_path, "log", "-1", "--format=%H")
  assert len(commit) == 40
  assert provenance.git_state(str(tmp_path)) == {"commit": commit, "dirty": False}
  (tmp_path / "untracked.txt").write_text("not part of the code\n")
  assert provenance.git_state(str(tmp_path))["dirty"] is False
  (tmp_path / "a.txt").write_text("two\n")
  assert provenance.git_state(str(tmp_path)) == {"commit": commit, "dirty": True}


def test_describe_gives_versions_devices_and_code():
  described = provenance.describe()
  assert described["libraries"]["jax"] == importlib.metadata.version("jax") == jax.__version__
  assert described["libraries"]["numpy"] == importlib.metadata.version("numpy")
  assert set(provenance.RECORDED_PACKAGES) <= set(described["libraries"])
  assert described["devices"]["count"] == len(jax.devices())
  assert described["devices"]["kind"] == jax.devices()[0].device_kind
  assert described["devices"]["platform"] == "cpu"
  if os.path.isdir(os.path.join(provenance.REPOSITORY, ".git")) or os.path.isfile(
      os.path.join(provenance.REPOSITORY, ".git")):
    assert described["code"]["commit"] == git(provenance.REPOSITORY, "rev-parse", "HEAD")


def test_report_states_the_provenance(tmp_path):
  described = provenance.describe()
  summary = {"source": "weights.npz", "protocol": {"dataset": "sysu_mm01"},
             "results": {"s": {"mean": {"cmc": [0.5], "mAP": 0.4, "mINP": 0.3},
                               "trials": [{}]}},
             "provenance": described}
  text = open(report.write_report(str(tmp_path), {}, summary, {})).read()
  assert "## Provenance" in text and f'"jax": "{jax.__version__}"' in text
  assert f'"count": {len(jax.devices())}' in text
