"""The same teacher steps on 1 device, on 4 (fake CPU) devices and on 2 processes give the same
losses: batch statistics and losses are over the global batch whatever the layout."""
import os
import socket

import pytest

from tests import xla_flags
from tests.test_train import finish
from tests.test_train import read_jsonl
from tests.test_train import run_py
from tests.test_train import tiny_overrides

# A small learning rate: from random init the first updates are chaotic (Adam's first step is
# about sign(gradient)), which would amplify reduction-order rounding into percent-level drift.
RUN = {"stage": "teacher", "teacher.epochs": 1, "teacher.steps_per_epoch": 3,
       "teacher.eval_every_epochs": 100, "checkpoint.every_steps": 3, "teacher.lr": 1e-6}


def losses_of(workdir):
  return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "teacher", "metrics.jsonl"))
          if "loss" in r}


def assert_same_losses(expected, actual):
  """Step 1's losses (one forward from identical weights) must agree to float32 rounding: BN
  statistics or losses computed per device would change them. Gradients are sums in another
  order, so later steps (after tiny updates) agree a little less tightly."""
  assert sorted(expected) == sorted(actual) == [1, 2, 3]
  for step, record in expected.items():
    tolerance = 1e-5 if step == 1 else 1e-3
    for name in ("loss", "memory_global", "memory_visible", "modality_kl", "centre_triplet"):
      assert actual[step][name] == pytest.approx(record[name], rel=tolerance, abs=1e-6), (
          step, name)
  assert actual[1]["grad_norm"] == pytest.approx(expected[1]["grad_norm"], rel=2e-3)


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("single")
  workdir = str(tmp / "run")
  finish(run_py(tiny_overrides(str(tmp), **RUN), workdir))
  return str(tmp), losses_of(workdir)


@pytest.mark.slow
def test_four_devices_match_one_device(single_device_run):
  tmp, expected = single_device_run
  workdir = os.path.join(tmp, "four")
  output = finish(run_py(tiny_overrides(tmp, **RUN), workdir, env_extra={
      "XLA_FLAGS": xla_flags.with_device_count(4)}))
  assert "4 device(s), 1 process(es)" in output
  assert_same_losses(expected, losses_of(workdir))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_device(single_device_run):
  tmp, expected = single_device_run
  workdir = os.path.join(tmp, "two_processes")
  address = f"127.0.0.1:{free_port()}"
  processes = [run_py(tiny_overrides(tmp, **RUN) + [
      f"--coordinator_address={address}", "--num_processes=2", f"--process_id={index}"],
      workdir) for index in range(2)]
  outputs = [finish(p) for p in processes]
  assert "2 device(s), 2 process(es)" in outputs[0]
  assert_same_losses(expected, losses_of(workdir))
