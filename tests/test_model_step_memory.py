"""benchmarks/model_step_memory.py: its peak-RSS reading follows a known allocation, and a tiny
side-by-side run reports both sides and XLA's plan."""
import subprocess
import sys

import pytest

from tests.benchmark_scripts import REPO, load_benchmark

PROBE = """
import sys
import numpy as np
sys.path.insert(0, {benchmarks!r})
import model_step_memory as m
held = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
del held  # freed: the peak keeps it, the resident memory does not
before_reset = m.status_bytes("VmHWM")
m.reset_peak()
after_reset = m.status_bytes("VmHWM")
rss = m.status_bytes("VmRSS")
block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
print(before_reset, after_reset, rss, m.status_bytes("VmHWM"))
"""


def test_the_peak_mark_resets_and_then_follows_a_known_allocation():
  done = subprocess.run([sys.executable, "-c", PROBE.format(benchmarks=f"{REPO}/benchmarks")],
                        capture_output=True, text=True, check=True, timeout=120)
  before_reset, after_reset, rss, peak = map(int, done.stdout.split())
  mib = 2**20
  assert before_reset - after_reset > 250 * mib  # the freed 300 MiB left the mark
  assert 190 * mib < peak - rss < 230 * mib  # the new block, and not much else


@pytest.mark.slow
def test_tiny_side_by_side_reports_both_sides(capsys):
  sides = load_benchmark("model_step_memory").main(
      ["--batch", "8", "--height", "32", "--width", "32", "--depth", "10", "--net-width", "8",
       "--threads", "1", "--conv-backward", "xla"])
  for side in ("jax", "torch"):
    assert sides[side]["peak"] >= sides[side]["resident_before"] > 100 * 2**20
  assert sides["jax"]["xla"]["temporaries"] > 0 and sides["jax"]["xla"]["arguments"] > 0
  printed = capsys.readouterr().out
  assert "one training step of 8 images at 32x32" in printed
  assert "JAX's step allocates" in printed and "x PyTorch's" in printed
