"""The run directory: checked before anything is written, locked while a run uses it, left tidy when it ends.

    check_workdir(workdir)                   # WorkdirError: a file, not writable, empty name (creates nothing)
    with WorkdirLock(workdir):               # creates the directory; one run per workdir; on exit removes the
      ...                                    # lock file and, for a directory this run created, empty leftovers

Process 0 holds the lock of a multi-process run; the others share its directory.
"""
from __future__ import annotations

import fcntl
import os
import time

from genjax.errors import WorkdirError

LOCK_FILE = ".lock"


class WorkdirPermissionError(WorkdirError, PermissionError):
  """The workdir (or the directory it would be made in) is not writable."""


def check_workdir(workdir: str) -> None:
  """Raises WorkdirError when `workdir` cannot hold a run; writes nothing."""
  if not workdir or not str(workdir).strip():
    raise WorkdirError(f"workdir={workdir!r} is empty; name a directory for checkpoints and metrics")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {workdir!r} is a file, not a directory; choose another --workdir")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"workdir {workdir!r} cannot be created: {existing!r} is a file")
  if not os.access(existing, os.W_OK):
    raise WorkdirPermissionError(f"workdir {workdir!r} is not writable" if existing == path else
                          f"workdir {workdir!r} is not writable (cannot create it in {existing!r})")


def _remove_empty_dirs(top: str) -> None:
  for root, _, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
    try:
      os.rmdir(root)                       # only succeeds on an empty directory
    except OSError:
      pass


class WorkdirLock:
  """One run per workdir: a second process gets a WorkdirError naming the holder instead of interleaved writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self.path = os.path.join(workdir, LOCK_FILE)
    self._created = not os.path.exists(workdir)
    self._f = None

  def __enter__(self) -> "WorkdirLock":
    os.makedirs(self.workdir, exist_ok=True)
    if not self.enabled:
      return self
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise WorkdirError(f"workdir {self.workdir!r} is in use by another training run ({holder}; lock "
                         f"{self.path}); wait for it to finish or choose another --workdir") from None
    f.seek(0)
    f.truncate()                           # who holds it, for the message above; the kernel drops the lock on death
    f.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    self._f = f
    return self

  def __exit__(self, *exc) -> None:
    if self._f is not None:
      os.remove(self.path)                 # while still holding it: a waiting run then takes a fresh file
      fcntl.flock(self._f, fcntl.LOCK_UN)
      self._f.close()
      self._f = None
    if self._created and self.enabled:
      _remove_empty_dirs(self.workdir)     # a run refused before writing anything leaves no directory behind
