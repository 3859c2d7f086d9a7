"""dakd_jax.host_allocator: freed buffers stay with the process (glibc), measured in a fresh
process by its resident memory and its allocator's free bytes around one freed block, and the
user's choice wins."""
import json
import os
import subprocess
import sys

import pytest

from dakd_jax import host_allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 MiB, above glibc's largest adaptive mmap threshold (32 MiB): by default the block is a
# mapping of its own, handed back to the kernel when freed.
PROBE = """
import json, sys
import numpy as np
sys.path.insert(0, "benchmarks")
from model_step_memory import status_bytes
from dakd_jax import host_allocator
kept = host_allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
block = np.ones(64 * 2**20 // 8)  # touched: resident
before = status_bytes("VmRSS")
del block
print(json.dumps({"kept": kept, "released": before - status_bytes("VmRSS"),
                  "free": host_allocator.free_bytes()}))
"""
GLIBC = host_allocator._glibc() is not None  # pylint: disable=protected-access


def probe(mode):
  environ = {k: v for k, v in os.environ.items()
             if k not in host_allocator.USERS_SETTINGS + (host_allocator.OPT_OUT_VARIABLE,)}
  done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                        check=True, timeout=120, cwd=REPO, env=environ)
  return json.loads(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only (this machine and CI: Debian)")
def test_a_freed_block_stays_with_the_process_and_is_counted_free():
  mib = 2**20
  default, kept = probe("default"), probe("keep")
  assert not default["kept"] and kept["kept"]
  assert default["released"] > 60 * mib and default["free"] < 64 * mib  # back to the kernel
  assert kept["released"] < 4 * mib and kept["free"] >= 64 * mib  # held for the next step


def test_the_users_own_setting_or_opt_out_leaves_glibc_as_it_is():
  assert host_allocator.users_choice({}) is None
  assert host_allocator.users_choice({"DAKD_KEEP_FREED_MEMORY": "1"}) is None
  assert host_allocator.users_choice({"DAKD_KEEP_FREED_MEMORY": "0"}) == (
      "DAKD_KEEP_FREED_MEMORY=0")
  assert host_allocator.users_choice({"MALLOC_TRIM_THRESHOLD_": "0"}) == (
      "MALLOC_TRIM_THRESHOLD_ is set")
  assert host_allocator.users_choice({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == (
      "GLIBC_TUNABLES sets glibc.malloc")
  assert host_allocator.users_choice({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None
  assert host_allocator.keep_freed_memory({"DAKD_KEEP_FREED_MEMORY": "0"}) is False
