"""The suite's XLA_FLAGS (tests/xla_flags.py): the quick compile is on in this session and
reaches child processes with their fake devices; the demo's run gets XLA's defaults back."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from tests import xla_flags


def test_the_session_compiles_quickly_unless_asked_not_to_and_children_keep_it():
  quick = os.environ.get("DAKD_TEST_QUICK_COMPILE", "1") != "0"
  assert (xla_flags.QUICK_COMPILE in os.environ.get("XLA_FLAGS", "")) == quick
  child = xla_flags.with_device_count(4)
  assert (xla_flags.QUICK_COMPILE in child) == quick
  assert child.split()[-1] == "--xla_force_host_platform_device_count=4"
  users = xla_flags.without_quick_compile()
  assert not any(name in users for name in xla_flags.USERS_COMPILER_OPTIONS)


def test_users_compiler_options_compile_the_same_function():
  def f(x):
    return jnp.tanh(x @ x.T).sum(axis=1)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16)), jnp.float32)
  users = jax.jit(f).lower(x).compile(xla_flags.USERS_COMPILER_OPTIONS)(x)
  np.testing.assert_allclose(users, jax.jit(f)(x), rtol=1e-5, atol=1e-6)
