"""XLA_FLAGS of the test processes: quick compiles, and fake CPU devices for child processes.

The suite compiles a few hundred small programs and runs each for milliseconds, so compiling
is most of its time. conftest.py compiles them quickly for the whole session (its workers and
subprocesses inherit the environment): no LLVM optimisation passes, and XLA:CPU's older,
quicker code generator for fusions instead of its MLIR fusion emitters. The programs compute
the same functions (XLA's contract; checked by the tests themselves, which compare against
independent references); float32 results may round differently within each test's tolerance;
the memory a program plans (XLA's buffer assignment) is within 0.01% of the defaults' (a
ResNet-18 gradient: 2,759,656 bytes of temporaries here against 2,759,528).
Measured on 2 cores, the whole suite's worker time: 1,177 s with XLA's defaults, 969 s without
the LLVM passes, 755 s with the older emitter too (and the tiny run's ResNet-10).
The exceptions are runs whose numbers are the README's (the demo's learning: a few ulps at the
start of training move where it ends) and tests whose subject is how the users' programs round:
they compile as users do (`without_quick_compile`, `USERS_COMPILER_OPTIONS`).
DAKD_TEST_QUICK_COMPILE=0 keeps XLA's defaults everywhere.
"""
import os

# option: (quick value, XLA's default)
_OPTIONS = {"xla_backend_optimization_level": (0, 3),
            "xla_llvm_disable_expensive_passes": (True, False),
            "xla_cpu_use_fusion_emitters": (False, True)}
QUICK_COMPILE = " ".join(f"--{name}={str(quick).lower()}"
                         for name, (quick, _) in _OPTIONS.items())
# XLA's defaults, for `jax.jit(f).lower(...).compile(...)` in a test whose subject is a property
# of the programs users run (e.g. two programs rounding alike).
USERS_COMPILER_OPTIONS = {name: default for name, (_, default) in _OPTIONS.items()}


def with_quick_compile(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) with the quick-compile flags added."""
  return f"{flags} {QUICK_COMPILE}".strip()


def without_quick_compile() -> str:
  """This process's XLA_FLAGS without the quick-compile flags: XLA's default compiler."""
  return " ".join(os.environ.get("XLA_FLAGS", "").replace(QUICK_COMPILE, "").split())


def with_device_count(device_count: int) -> str:
  """This process's XLA_FLAGS plus `device_count` CPU devices, for a child process."""
  return (f"{os.environ.get('XLA_FLAGS', '')} "
          f"--xla_force_host_platform_device_count={device_count}").strip()
