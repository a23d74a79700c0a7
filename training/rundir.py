"""Run directories: a new one per run, held by one process at a time.

`open_run_dir` picks the directory (`--resume DIR` > `--run_dir DIR` > a new `runs/<script>-<UTC
time>`), and takes its lock for the rest of the process:

* A default directory is created with `os.mkdir`, which fails when it exists, so runs started in
  the same second (a sweep's trials) each get their own (`-2`, `-3`, ... appended).
* The lock is `RUN_DIR/run.lock`, an exclusive `fcntl.flock` held while the process lives, with the
  holder's pid and host written into it for the message.  A second process on the same directory is
  refused, naming the holder; a lock left by a dead process is no lock at all (the kernel releases
  flocks on exit), so a crashed run can be resumed at once.  Under torchrun only rank 0 locks.
"""
from __future__ import annotations

import atexit
import os
import socket
import time
from pathlib import Path
from typing import Optional

from common.errors import UserError

LOCK_NAME = "run.lock"
_held: dict[str, int] = {}  # resolved path -> open lock fd (kept open for the life of the process)


class RunDirBusy(UserError):
    """Another live process holds the run directory."""


def lock_run_dir(path: str | Path) -> Path:
    """Take the run directory's lock for the rest of this process (idempotent)."""
    import fcntl

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _held or int(os.environ.get("RANK", "0")) != 0:
        return path
    lock = path / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunDirBusy(f"{path} is in use by {holder}; wait for that run to end, or choose another --run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[key] = fd
    return path


def release_run_dir(path: str | Path) -> None:
    import fcntl

    fd = _held.pop(str(Path(path).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release_run_dir(key)


def new_run_dir(script: str, root: str | Path = "runs") -> Path:
    """A directory that did not exist before: runs/<script>-<UTC time>[-N]."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{script}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    for n in range(1, 10_000):
        path = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f"{root}: could not create a new run directory for {script}; pass --run_dir")


def open_run_dir(script: str, run_dir: Optional[str] = None, resume: bool = False) -> Path:
    """The run's directory, locked: the one to resume, the one given, or a new default one."""
    if resume:
        path = Path(run_dir or "")
        if not run_dir or not path.is_dir():
            raise UserError(f"--resume {run_dir}: no such run directory")
        return lock_run_dir(path)
    if run_dir:
        return lock_run_dir(Path(run_dir))
    from training.distributed import broadcast_object, is_main

    path = broadcast_object(str(new_run_dir(script)) if is_main() else None)  # torchrun: rank 0's, everywhere
    return lock_run_dir(Path(path))
