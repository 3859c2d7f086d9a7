"""Runs a command under a storage restriction, for the storage-failure tests (test_cli.py).

  python tests/restricted.py permissions COMMAND...   file permissions apply, even to root
  python tests/restricted.py small_disk COMMAND...    no file may grow past 40 kB

A fresh interpreter applies the restriction, then replaces itself with COMMAND (exec), which
keeps it: root's capabilities to ignore permissions are dropped from the bounding set, so the
exec'd program never holds them; a file size limit (RLIMIT_FSIZE) makes the kernel refuse writes
past it (EFBIG) as a full disk refuses them (ENOSPC), with the signal it would send ignored.
Done here rather than in a `preexec_fn`, which would run Python in a forked copy of a
multithreaded test process.
"""
import ctypes
import os
import resource
import signal
import sys

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
SMALL_DISK_BYTES = 40_000


def obey_file_permissions() -> None:
  if os.geteuid() != 0:
    return  # Permissions already apply.
  libc = ctypes.CDLL(None, use_errno=True)
  for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
    if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
      sys.exit(f"restricted.py: prctl(PR_CAPBSET_DROP) failed ({os.strerror(ctypes.get_errno())}"
               "): a root process cannot be made to obey file permissions here")


def small_disk() -> None:
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Refused writes then fail, not kill.
  resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL_DISK_BYTES, SMALL_DISK_BYTES))


RESTRICTIONS = {"permissions": obey_file_permissions, "small_disk": small_disk}

if __name__ == "__main__":
  if sys.argv[1] == "small_disk":
    # The suite's shared compilation cache (conftest.py) is not the restricted run's storage:
    # a cache entry cut at the size limit would be left for every later test to trip over. It
    # is read, never written: JAX writes no entry smaller than this minimum (nor anything on a
    # read, without a size limit of its own). Under `permissions` it stays as it is: the cache
    # folder is the caller's own, writable by it.
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = str(2**62)
  RESTRICTIONS[sys.argv[1]]()
  os.execv(sys.argv[2], sys.argv[2:])
