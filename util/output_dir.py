"""The run's ``--output_dir``: writable, owned by one run (a lock file), and new unless the run continues it."""

import errno
import fcntl
import os
import re
import socket

from util.errors import OutputError


def check_writable(path: str, flag: str = "--output_dir"):
    """Create ``path`` if needed, then write, fsync and delete a small file in it; ``OutputError`` if that fails."""
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(4096))
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"{flag} {path} is not a writable directory: {err}") from err


def check_output_file(path: str, flag: str):
    """Before the work that produces it: the folder of the output file ``path`` is (made) a writable directory;
    ``OutputError`` naming the flag and the file otherwise."""
    try:
        check_writable(os.path.dirname(os.path.abspath(path)), flag)
    except OutputError as err:
        raise OutputError(f"{flag} {path} cannot be written: {err.__cause__}") from err


LOCK_FILENAME = ".run.lock"
"""The file in ``--output_dir`` that the run owning the directory holds locked; it names that run's PID and host."""


_output_lock = {"fd": None}


def lock_output_dir(path: str):
    """Make this process the owner of ``path``: a POSIX lock (``fcntl.lockf``) on ``path/.run.lock`` that holds
    until ``release_output_dir`` or the end of the process, a SIGKILL included (the kernel drops it), so no stale
    lock is ever left; DataLoader workers do not inherit it. ``OutputError`` naming the PID and host of the
    owner if another process holds it. Where the file system has no locks, a warning says so and the run goes on.
    """
    release_output_dir()
    lock_path = os.path.join(path, LOCK_FILENAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            print(f"WARNING: cannot lock {lock_path} ({err}); a second run on --output_dir {path} would not be noticed")
            return
        owner = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not written its PID yet"
        os.close(fd)
        raise OutputError(
            f"--output_dir {path} is in use by another run: {owner} holds {lock_path}. Wait for it to end, or choose "
            "another --output_dir"
        ) from err
    os.ftruncate(fd, 0)
    os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode())
    _output_lock["fd"] = fd


def release_output_dir():
    """Give up the ``--output_dir`` lock of ``lock_output_dir`` (no-op without one)."""
    if _output_lock["fd"] is not None:
        os.close(_output_lock["fd"])
        _output_lock["fd"] = None


def check_new_or_resumed(args):
    """Refuse an ``--output_dir`` that holds an earlier run's ``log.txt`` or checkpoints, unless this run continues
    it (``--auto_resume`` or ``--resume``): appending to its log and overwriting its checkpoints would mix two runs."""
    if getattr(args, "auto_resume", False) or getattr(args, "resume", ""):
        return
    names = sorted(os.listdir(args.output_dir))
    found = [n for n in names if n == "log.txt" or re.fullmatch(r"checkpoint-\w+\.pth", n)]
    if found:
        raise OutputError(
            f"--output_dir {args.output_dir} holds an earlier run ({', '.join(found)}); pass --auto_resume to continue "
            "it, or choose another (or an empty) --output_dir"
        )
