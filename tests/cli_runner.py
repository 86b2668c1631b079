"""Run many command lines of the repository's scripts with one interpreter start: ``python tests/cli_runner.py``
reads a JSON list of runs on stdin, each ``{"argv": [script, arg, ...], "out": PREFIX}`` (``["-m", module, ...]``
for ``python -m module ...``; with ``"signal_at": TEXT`` the child gets a SIGTERM once TEXT is in its stdout),
imports torch and the scripts' modules once, then forks one child per run, in order. The child runs the
script's ``__main__`` block with ``sys.argv = argv`` (what ``python script arg ...`` runs), its stdout and stderr
going to ``PREFIX.out`` and ``PREFIX.err``, and ends the way the interpreter would: status 0, an integer
``SystemExit`` status, a string ``SystemExit`` printed to stderr with status 1, any other exception's traceback
printed with status 1. The parent prints one JSON object: {PREFIX: exit status}.

A fresh interpreter per run costs ~3 s of imports; a fork costs milliseconds.
"""

import json
import os
import runpy
import signal
import sys
import time
import traceback

import torch  # noqa: F401  (imported once, before the forks)

import models_checkpoint  # noqa: F401
import util.cli  # noqa: F401
import util.data.builders  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(argv: list[str]) -> int:
    """The script's ``__main__`` block, ended as the interpreter ends it; returns the exit status."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.modules.pop(argv[1], None)  # imported above; run afresh as __main__
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(os.path.join(REPO, argv[0]), run_name="__main__")
        return 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def run(argv: list[str], prefix: str, signal_at: str | None = None) -> int:
    """Fork, run ``argv`` in the child with its output in ``prefix``.out / .err; the child's exit status.
    ``signal_at``: send the child SIGTERM once this text is in its stdout."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            for fd, suffix in ((1, ".out"), (2, ".err")):
                os.dup2(os.open(prefix + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            status = run_child(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    while signal_at:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(wait_status)
        if os.path.exists(prefix + ".out"):
            with open(prefix + ".out", errors="replace") as f:
                if signal_at in f.read():
                    os.kill(pid, signal.SIGTERM)
                    break
        time.sleep(0.05)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


if __name__ == "__main__":
    os.chdir(REPO)
    statuses = {run_["out"]: run(run_["argv"], run_["out"], run_.get("signal_at")) for run_ in json.load(sys.stdin)}
    print(json.dumps(statuses))
