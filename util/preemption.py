"""Stop signals (SIGTERM / SIGUSR1): stop training at a step, save, and continue mid-epoch on resume."""

import os
import signal
import threading

import torch
import torch.distributed as dist

from util.distributed import get_world_size, is_dist_avail_and_initialized
from util.metric_log import LossTracker, MetricLogger

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that stop training with a checkpoint: SIGTERM (Slurm preemption, ``scancel``, torchrun shutting down,
``kill``) and SIGUSR1 (e.g. ``sbatch --signal=USR1@120``). submitit's SIGUSR2 requeue is left to submitit."""


PROGRESS_KEY = "epoch_progress"
"""Checkpoint entry of a mid-epoch stop: ``{'step', 'meters', 'world_size', 'batch_size'}``."""


_stop = {"signum": 0, "installed": False, "previous": {}, "group": None}


class TrainingStopped(Exception):
    """Training stopped on a stop signal; the entry point saves a checkpoint, sets ``checkpoint`` and re-raises.

    ``step``: steps of ``epoch`` done (0: stopped after the whole epoch); ``meters``: the epoch's metric sums so
    far ({name: [total, count]}); ``batch_size``: per process, to check that a resumed run can continue mid-epoch.
    """

    def __init__(self, signum: int, epoch: int, step: int = 0, meters: dict | None = None, batch_size: int = 0):
        super().__init__(signum, epoch, step)
        self.signum, self.epoch, self.step = signum, epoch, step
        self.meters, self.batch_size = meters or {}, batch_size
        self.checkpoint = None
        self.unsaved = False  # set when the run has no --output_dir: nothing was saved

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the status of a process killed by that signal."""
        return 128 + self.signum

    @property
    def progress(self) -> dict:
        """The ``PROGRESS_KEY`` checkpoint entry that lets ``--auto_resume`` continue this epoch mid-way."""
        return {"step": self.step, "meters": self.meters, "world_size": get_world_size(), "batch_size": self.batch_size}

    def __str__(self):
        name = signal.Signals(self.signum).name
        where = f"at epoch {self.epoch}, step {self.step} (mid-epoch)" if self.step else f"after epoch {self.epoch}"
        if self.unsaved:
            return f"Stopped by {name} {where}; nothing was saved (--output_dir is ''), so the run cannot continue."
        saved = f"saved {self.checkpoint}" if self.checkpoint else "rank 0 saved the checkpoint"
        return f"Stopped by {name} {where}; {saved}. Continue with --auto_resume (or --resume <checkpoint>)."


def _on_stop_signal(signum, frame):
    """Note the signal for ``stop_requested``; a second one meets the previous handler (by default: exit)."""
    _stop["signum"] = _stop["signum"] or signum
    signal.signal(signum, _stop["previous"].pop(signum, signal.SIG_DFL))
    # os.write, not print: the signal may interrupt a print to the same stream
    os.write(2, f"Received {signal.Signals(signum).name}: saving a checkpoint after the current step\n".encode())


def install_stop_handlers() -> list[str]:
    """Make SIGTERM / SIGUSR1 stop training with a checkpoint; call on every process before the epoch loop.

    Only signals at their default disposition are taken, so a launcher's handlers stay in force (under submitit,
    SIGTERM is its 'bypass' and SIGUSR2 its requeue). The engines poll ``stop_requested`` after each optimizer
    step. When distributed this creates a gloo group for that poll (a CPU all-reduce, no device sync).
    Returns the names of the signals taken.
    """
    _stop["signum"] = 0
    if is_dist_avail_and_initialized() and not _stop["installed"] and dist.get_backend() != "gloo":
        _stop["group"] = dist.new_group(backend="gloo")
    _stop["installed"] = True
    taken = []
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if current == signal.SIG_DFL:
                _stop["previous"][signum] = current
                signal.signal(signum, _on_stop_signal)
            if signal.getsignal(signum) == _on_stop_signal:
                taken.append(signum.name)
    left = [s.name for s in STOP_SIGNALS if s.name not in taken]
    print(f"Stop signals (checkpoint, then exit): {', '.join(taken) or 'none'}; left to the launcher: {left}")
    return taken


def restore_stop_handlers():
    """Give the stop signals back their previous handlers (end of training)."""
    for signum, previous in _stop["previous"].items():
        signal.signal(signum, previous)
    _stop.update(signum=0, installed=False, previous={}, group=None)


def stop_requested() -> int:
    """The stop signal any process received since ``install_stop_handlers`` (0: none; always 0 before it).

    Collective when distributed: every process calls it at the same steps, so all stop at the same step.
    """
    if not _stop["installed"]:
        return 0
    signum = _stop["signum"]
    if is_dist_avail_and_initialized():
        flag = torch.tensor([signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_stop["group"])
        signum = int(flag.item())
    return signum


def stop_if_requested(epoch: int, step: int, tracker: LossTracker, metric_logger: MetricLogger, batch_size: int):
    """In an engine, after the optimizer update of ``step``: raise ``TrainingStopped`` if a stop signal came.

    The losses since the last logging step are checked first (a NaN/inf raises ``NonFiniteLossError`` instead,
    so a bad state is never saved) and added to the loss meter, whose sums travel in the exception.
    """
    signum = stop_requested()
    if not signum:
        return
    if tracker.count:
        metric_logger.update(**tracker.flush())
    meters = {name: [meter.total, meter.count] for name, meter in metric_logger.meters.items()}
    raise TrainingStopped(signum, epoch, step + 1, meters, batch_size)


def stop_after_epoch(args, epoch: int, checkpoint: str | None):
    """After ``epoch`` is saved (to ``checkpoint``): raise ``TrainingStopped`` if a stop signal came meanwhile
    (during evaluation or saving) and epochs remain."""
    signum = stop_requested()
    if signum and epoch + 1 < args.epochs:
        stop = TrainingStopped(signum, epoch)
        stop.checkpoint = checkpoint
        stop.unsaved = not args.output_dir
        raise stop


def resume_progress(checkpoint: dict | None, args) -> dict | None:
    """The mid-epoch position of a checkpoint saved on a stop signal, if this run can continue from it.

    It can when the number of processes and the batch size are unchanged; otherwise the epoch restarts from its
    first step (the steps already done in it are then trained twice).
    """
    progress = (checkpoint or {}).get(PROGRESS_KEY)
    if not progress or getattr(args, "eval", False):
        return None
    if (progress["world_size"], progress["batch_size"]) != (get_world_size(), args.batch_size):
        print(
            f"The checkpoint stopped epoch {args.start_epoch} at step {progress['step']} with "
            f"{progress['world_size']} process(es) x --batch_size {progress['batch_size']}; with "
            f"{get_world_size()} x {args.batch_size} that epoch restarts from its first step"
        )
        return None
    print(f"Continuing epoch {args.start_epoch} at step {progress['step']}")
    return progress


def restore_meters(metric_logger: MetricLogger, progress: dict | None) -> int:
    """Put a mid-epoch checkpoint's metric sums back into ``metric_logger``; returns the first step to run."""
    if not progress:
        return 0
    for name, (total, count) in progress["meters"].items():
        meter = metric_logger.meters[name]
        meter.total, meter.count = total, count
    return progress["step"]
