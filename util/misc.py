"""Training utilities: distributed setup, rank helpers, metric logging, AMP, checkpoints, RNG state, and the
handling of faults (user-facing errors, stop signals).

Checkpoints hold only tensors and plain Python values, so ``torch.load(weights_only=True)`` (torch's default since
2.6) reads them; they are written atomically (``*.tmp``, fsync, rename, fsync of the directory).
"""

import argparse
import ast
import builtins
import datetime
import errno
import fcntl
import glob
import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------------------------
# distributed


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def save_on_master(*args, **kwargs):
    """``torch.save`` on rank 0 only."""
    if is_main_process():
        torch.save(*args, **kwargs)


def reduction_device() -> torch.device:
    """Device for collective tensors: the current CUDA device with NCCL, else the CPU (gloo)."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(x: float) -> float:
    """Mean of a Python number over all processes (the number itself when not distributed)."""
    world_size = get_world_size()
    if world_size == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64, device=reduction_device())
    dist.all_reduce(t)
    return t.item() / world_size


def setup_for_distributed(is_master: bool):
    """Silence ``print`` on every process but the master; ``print(..., force=True)`` still prints (timestamped)."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            if force and not is_master:
                builtin_print(f"[{datetime.datetime.now().time()}] ", end="")
            builtin_print(*args, **kwargs)

    builtins.print = print


def _init_slurm_env(args):
    """Rank, world size and local rank of a multi-task Slurm job; exports MASTER_ADDR/PORT for ``env://``.

    Uses ``submitit.helpers.TorchDistributedEnvironment`` (it also works under plain ``srun``); without submitit
    the rendezvous must come from ``--dist_url`` or MASTER_ADDR/MASTER_PORT.
    """
    try:
        from submitit.helpers import TorchDistributedEnvironment

        # outside a submitit job (plain srun) submitit's Slurm environment still reads SLURM_*, once told to
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
        env = TorchDistributedEnvironment()
        if args.dist_url == "env://":
            env.export(set_cuda_visible_devices=False, overwrite=True)
        return env.rank, env.world_size, env.local_rank
    except ImportError:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])


def init_distributed_mode(args):
    """Set ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` and join the process group.

    Launchers, in order: ``--dist_on_itp`` (OpenMPI env), torchrun (RANK/WORLD_SIZE/LOCAL_RANK, ``env://``),
    a Slurm job with more than one task (SLURM_PROCID/SLURM_NTASKS, e.g. submitted by submitit), else a single
    process. Backend: NCCL when training on CUDA, else gloo. The CUDA device is picked from the local rank.
    """
    if getattr(args, "dist_on_itp", False):
        args.rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
        args.world_size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
        args.gpu = int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        args.dist_url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        os.environ.update(LOCAL_RANK=str(args.gpu), RANK=str(args.rank), WORLD_SIZE=str(args.world_size))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        args.rank, args.world_size, args.gpu = _init_slurm_env(args)
    else:
        print("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        setup_for_distributed(True)
        return

    args.distributed = True
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        args.gpu = args.gpu % torch.cuda.device_count()
        torch.cuda.set_device(args.gpu)
    args.dist_backend = "nccl" if use_cuda else "gloo"
    print(
        f"| distributed init (rank {args.rank}/{args.world_size}): {args.dist_url}, backend {args.dist_backend}",
        flush=True,
    )
    dist.init_process_group(
        backend=args.dist_backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank
    )
    dist.barrier(device_ids=[args.gpu] if use_cuda else None)
    setup_for_distributed(args.rank == 0)


def cleanup_distributed():
    """Leave the process group (if any) so the process exits cleanly."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------------------
# metric logging


class SmoothedValue:
    """Tracks a series of values: windowed median/mean plus the global (weighted) average."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum ``count`` and ``total`` over processes (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=reduction_device())
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


def is_log_step(step: int, num_steps: int, print_freq: int) -> bool:
    """Whether ``MetricLogger.log_every`` prints after ``step`` (every ``print_freq`` steps and the last one)."""
    return step % print_freq == 0 or step == num_steps - 1


class MetricLogger:
    """A set of named ``SmoothedValue`` meters and a progress printer with ETA."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        """``name=value`` or ``name=(value, n)``; tensors are converted with ``.item()`` (a host sync)."""
        for name, value in kwargs.items():
            n = 1
            if isinstance(value, tuple):
                value, n = value
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value), n)

    def add_meter(self, name: str, meter: SmoothedValue):
        self.meters[name] = meter

    def __getattr__(self, name):
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq: int, header: str = ""):
        """Yield from ``iterable``; after steps where ``is_log_step`` holds, print meters, ETA and timings.

        Timings are host wall-clock times without device synchronisation.
        """
        num_steps = len(iterable)
        width = len(str(num_steps))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for step, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if is_log_step(step, num_steps, print_freq):
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (num_steps - step - 1)))
                parts = [f"{header} [{step:>{width}}/{num_steps}]", f"eta: {eta}", str(self)]
                parts += [f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total = time.time() - start
        per_step = total / max(num_steps, 1)
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total))} ({per_step:.4f} s / it)")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


class LossTracker:
    """Accumulates per-step losses and gradient norms on the device without host synchronisation.

    ``update`` adds the loss to a running sum and records the first step whose loss is not finite, all as
    device-side tensor ops; likewise the gradient norm of each optimizer step (``NativeScaler``'s return value),
    of which only finite ones count (an fp16 step that the scaler skips has an infinite norm). ``flush`` (called
    at logging steps, the last step of an epoch included) reads them back with one transfer, reduces them over
    processes and raises ``NonFiniteLossError`` naming the epoch and the first bad step. Training is therefore
    stopped at the next logging step after a NaN/inf appears; the parameters may be corrupted by then, but no
    checkpoint is written after it, so ``checkpoint-last.pth`` holds the last good state.
    """

    def __init__(self, device: torch.device, epoch: int):
        self.epoch = epoch
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.count = 0
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm_count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, loss: torch.Tensor, step: int, grad_norm: torch.Tensor | None = None):
        """Add the loss of ``step`` and, on optimizer steps, its gradient norm (None on accumulation steps)."""
        loss = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)
        self.count += 1
        if grad_norm is not None:
            grad_norm = grad_norm.detach().to(torch.float64)
            finite = torch.isfinite(grad_norm)
            self.grad_norm_sum += torch.where(finite, grad_norm, 0.0)
            self.grad_norm_count += finite

    def flush(self) -> dict[str, tuple[float, int]]:
        """Return the meter updates since the last flush and reset: ``{'loss': (mean over all processes, steps)}``,
        plus ``'grad_norm': (mean, optimizer steps)`` when a step with a finite gradient norm was among them."""
        never = torch.iinfo(torch.int64).max
        bad = torch.where(self.first_bad < 0, never, self.first_bad)
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.device)
        stats = torch.stack([self.loss_sum, count, self.grad_norm_sum, self.grad_norm_count])
        if is_dist_avail_and_initialized():
            stats, bad = stats.to(reduction_device()), bad.to(reduction_device())
            dist.all_reduce(stats)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad_step = int(bad.item())
        if bad_step != never:
            raise NonFiniteLossError(
                f"Loss is not finite at epoch {self.epoch}, step {bad_step}; stopping training. "
                "The last checkpoint written before this epoch is left as it was."
            )
        loss_sum, count, grad_norm_sum, grad_norm_count = stats.tolist()
        meters = {"loss": (loss_sum / count, self.count)}
        if grad_norm_count:  # every process steps together, so each holds 1 / world size of the count
            meters["grad_norm"] = (grad_norm_sum / grad_norm_count, round(grad_norm_count / get_world_size()))
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.grad_norm_count.zero_()
        self.count = 0
        return meters


# --------------------------------------------------------------------------------------------------------------
# user-facing errors and stop signals (preemption)

MAX_LISTED = 10
"""How many mismatched keys of each kind a ``CheckpointMismatchError`` lists."""


class RunError(RuntimeError):
    """A problem the user can act on (a checkpoint, the output directory, a flag); ``run_main`` prints it as
    ``ERROR: <message>`` and exits with status 1, without a traceback."""


class CheckpointError(RunError):
    """A checkpoint file cannot be read, is not a checkpoint, or needs ``--unsafe_load``."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model; the message lists the mismatched keys and shapes."""


class OutputError(RunError):
    """``--output_dir`` / ``--log_dir`` cannot be written (permissions, not a directory, disk full)."""


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


def log_train_step(step, num_steps, epoch, lr, tracker, metric_logger, log_writer, print_freq):
    """In an engine, after ``step``: at logging steps move the tracked losses and gradient norms to the host, into
    the meters and TensorBoard (``train_loss``, ``train_grad_norm`` and ``lr`` at x = 1000 x fractional epoch)."""
    if not is_log_step(step, num_steps, print_freq):
        return
    meters = tracker.flush()
    metric_logger.update(**meters, lr=lr)
    if log_writer is not None:
        epoch_1000x = int((epoch + (step + 1) / num_steps) * 1000)
        for name, (value, _) in meters.items():
            log_writer.add_scalar(f"train_{name}", value, epoch_1000x)
        log_writer.add_scalar("lr", lr, epoch_1000x)


def save_stopped(stop, args, epoch: int, model_without_ddp, optimizer, loss_scaler, log_writer, extra=None):
    """After an engine raised ``TrainingStopped``: save ``checkpoint-last.pth`` with the position inside the epoch
    (``PROGRESS_KEY``, read back by ``resume_progress``) and flush TensorBoard; ``run_main`` then exits."""
    extra = {**(extra or {}), PROGRESS_KEY: stop.progress}
    stop.checkpoint = save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra, tag="last")
    if log_writer is not None:
        log_writer.flush()


def end_training(start_time: float, log_writer=None):
    """After the last epoch: print the training time, close TensorBoard, restore the signal handlers, give up the
    ``--output_dir`` lock and leave the process group."""
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if log_writer is not None:
        log_writer.close()
    restore_stop_handlers()
    release_output_dir()
    cleanup_distributed()


def stop_after_epoch(args, epoch: int, checkpoint: str | None):
    """After ``epoch`` is saved (to ``checkpoint``): raise ``TrainingStopped`` if a stop signal came meanwhile
    (during evaluation or saving) and epochs remain."""
    signum = stop_requested()
    if signum and epoch + 1 < args.epochs:
        stop = TrainingStopped(signum, epoch)
        stop.checkpoint = checkpoint
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


def error_message(err: BaseException) -> str:
    """The message of ``err``. A DataLoader re-raises a worker's exception with the worker's whole traceback as
    its message; of such an error only the worker's own message is kept, and the worker is named."""
    text = str(err)
    worker = re.match(r"Caught \w+ (in DataLoader worker process \d+)\.\nOriginal Traceback", text)
    if worker is None:
        return text
    original = text.rpartition(f"{type(err).__module__}.{type(err).__qualname__}: ")[2].strip()
    return f"{original or text.strip().splitlines()[-1]} ({worker.group(1)})"


def end_loader_workers():
    """SIGKILL the daemonic child processes still alive, i.e. DataLoader workers of an epoch that ended in an
    error. They ignore SIGTERM (``_worker_ignores_stop_signals``), so multiprocessing's exit handler, which
    terminates them with SIGTERM and then joins them, would wait for ever."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def run_main(main, args, errors: tuple = ()):
    """Run ``main(args)`` for a command line.

    A stop signal ends the process with status 128 + its number after the checkpoint is saved; ``RunError``,
    ``NonFiniteLossError`` and the exception types in ``errors`` (e.g. ``DatasetError``, also when a DataLoader
    worker raised it) end it with ``ERROR: <message>`` on stderr and status 1, without a traceback. The
    ``--output_dir`` lock is given up either way.
    """
    try:
        return main(args)
    except TrainingStopped as stop:
        sys.stderr.write(f"{stop}\n")
        status = stop.exit_code
    except (RunError, NonFiniteLossError, *errors) as err:
        status = f"ERROR: {error_message(err)}"
    finally:
        end_loader_workers()
        release_output_dir()
    sys.exit(status)


# --------------------------------------------------------------------------------------------------------------
# AMP

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """``--amp`` default: bf16 on CUDA when supported, else fp16 on CUDA; 'none' on the CPU."""
    if amp is not None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got '{amp}'")
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "none"


def autocast(device: torch.device, amp: str):
    """Autocast context for ``amp`` ('bf16' | 'fp16' | 'none') on ``device``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class NativeScaler:
    """Backward + optional gradient clipping + optimizer step, with a ``torch.amp.GradScaler`` for fp16.

    Returns the total gradient norm (a device tensor, before clipping) on update steps, None on accumulation
    steps. The scaler is a no-op for bf16 and fp32.
    """

    state_dict_key = "scaler"

    def __init__(self, device: torch.device, amp: str):
        self._scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    @property
    def enabled(self) -> bool:
        return self._scaler.is_enabled()

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        self._scaler.load_state_dict(state_dict)


def maybe_no_sync(model, skip_sync: bool):
    """DDP's ``no_sync()`` on gradient-accumulation steps; a null context otherwise or without DDP."""
    if skip_sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


# --------------------------------------------------------------------------------------------------------------
# seeding and RNG state


def seed_everything(seed: int):
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global RNG is what timm Mixup and user code draw from
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed derived from (seed, epoch, rank) alone, e.g. for a DataLoader generator."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def get_rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002 - see seed_everything
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def set_rng_state(state: dict):
    """Restore the states saved by ``get_rng_state``."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - see seed_everything
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss_next"]))
    cuda_state = state.get("cuda")
    if cuda_state is not None and torch.cuda.is_available() and len(cuda_state) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_state)


def gather_rng_states() -> list[dict]:
    """Every process's RNG state, indexed by rank (collective call when distributed)."""
    state = get_rng_state()
    if not is_dist_avail_and_initialized():
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


# --------------------------------------------------------------------------------------------------------------
# checkpoints


def _plain(value):
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def args_to_dict(args) -> dict:
    """``vars(args)`` with every value made a plain Python value (unknown types become ``str``)."""
    return {k: _plain(v) for k, v in vars(args).items()}


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err`` (itself, or in its chain of causes)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def atomic_save(obj, path: str):
    """``torch.save`` to ``path + '.tmp'``, flush and fsync, rename over ``path``, fsync the directory.

    A write error (disk full, file too large, read-only file system) raises an ``OSError`` naming the file, also
    where ``torch.save`` reports it without a file name or as an opaque ``RuntimeError``; ``path`` is then left
    as it was.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        cause = _os_error(err)
        if cause is None or (cause is err and (cause.filename or cause.errno is None)):
            raise
        raise OSError(cause.errno, cause.strerror, tmp) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _atomic_link_or_copy(src: str, dst: str):
    """Make ``dst`` a hard link to ``src`` (a copy where links are unsupported), atomically."""
    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def save_model(args, epoch: int, model_without_ddp, optimizer, loss_scaler, extra: dict | None = None, tag=None):
    """Write a checkpoint of ``epoch`` (0-based) into ``args.output_dir``; call on every process.

    Without ``tag``: ``checkpoint-last.pth`` always, and ``checkpoint-{epoch}.pth`` too every ``args.save_every``
    epochs and at the final epoch (a hard link to the same file). With ``tag`` (e.g. 'best'):
    ``checkpoint-{tag}.pth`` only. ``extra`` entries are added to the dict (plain values/tensors only).
    Returns the path written (rank 0) or None.
    """
    rng = gather_rng_states()
    if not is_main_process() or not args.output_dir:
        return None
    checkpoint = {
        "model": model_without_ddp.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
        "epoch": epoch,
        "args": args_to_dict(args),
        "rng": rng,
        **(extra or {}),
    }
    path = os.path.join(args.output_dir, f"checkpoint-{'last' if tag is None else tag}.pth")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        atomic_save(checkpoint, path)
        save_every = getattr(args, "save_every", 0) or 0
        if tag is None and ((save_every > 0 and (epoch + 1) % save_every == 0) or epoch + 1 == args.epochs):
            _atomic_link_or_copy(path, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
    except OSError as err:
        raise OutputError(
            f"could not save the checkpoint of epoch {epoch}: {err}. The checkpoints already in {args.output_dir} "
            "are intact; free some space (or fix --output_dir) and continue with --auto_resume"
        ) from err
    return path


def load_checkpoint(path: str, unsafe: bool = False) -> dict:
    """Load a checkpoint onto the CPU; ``weights_only=True`` unless ``unsafe`` (full unpickling, trusted files).

    ``argparse.Namespace`` is allowed as well: the published fine-tuned MAE checkpoints store their ``'args'`` as one
    (it holds plain values only). Raises ``CheckpointError`` for a missing or unreadable file, and for one holding
    pickled objects other than tensors and plain values (refused without ``unsafe``: unpickling them could run
    arbitrary code).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as err:
        if not unsafe and "weights_only" in str(err):
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" (it contains a pickled {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain values{what}, so torch.load(weights_only=True) "
                "refused it: unpickling them could run arbitrary code. If you trust the file, pass --unsafe_load"
            ) from err
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read the checkpoint {path}: {reason}") from err


def check_state_dict(model, state_dict: dict, source: str, allow_missing=(), allow_unexpected: bool = False):
    """Raise ``CheckpointMismatchError`` unless ``state_dict`` fits ``model``.

    Compares keys and tensor shapes; keys in ``allow_missing`` may be absent, extra keys are allowed with
    ``allow_unexpected``. The message lists up to ``MAX_LISTED`` problems of each kind.
    """
    own = model.state_dict()
    shapes = [
        f"{key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape)
    ]
    missing = [key for key in own if key not in state_dict and key not in set(allow_missing)]
    unexpected = [] if allow_unexpected else [key for key in state_dict if key not in own]
    if not (shapes or missing or unexpected):
        return
    lines = [f"{source} does not fit the model ({type(model).__name__}):"]
    for title, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            more = f" (first {MAX_LISTED} shown)" if len(items) > MAX_LISTED else ""
            lines += [f"  {len(items)} {title}{more}:"] + [f"    {item}" for item in items[:MAX_LISTED]]
    lines.append(
        "It was written for another model, size or channel count: check --model, --model_kwargs, --patch_size, "
        "--input_size and the data's channels (--channels / --in_chans) against the run that wrote it."
    )
    raise CheckpointMismatchError("\n".join(lines))


def find_latest_checkpoint(output_dir: str) -> str | None:
    """``checkpoint-last.pth`` in ``output_dir`` if present, else the highest-numbered ``checkpoint-N.pth``."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    last = os.path.join(output_dir, "checkpoint-last.pth")
    if os.path.isfile(last):
        return last
    numbered = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if match:
            numbered.append((int(match.group(1)), path))
    return max(numbered)[1] if numbered else None


def resolve_resume(args) -> str:
    """``args.resume``, filled in from ``find_latest_checkpoint(args.output_dir)`` under ``--auto_resume``."""
    if not getattr(args, "resume", "") and getattr(args, "auto_resume", False):
        args.resume = find_latest_checkpoint(args.output_dir) or ""
        if args.resume:
            print(f"Auto-resuming from {args.resume}")
    return getattr(args, "resume", "")


def load_model(args, model_without_ddp, optimizer=None, loss_scaler=None) -> dict | None:
    """Resume from ``args.resume`` (or, with ``args.auto_resume``, the newest checkpoint in ``args.output_dir``).

    Restores the model and, unless ``args.eval``, the optimizer, scaler, ``args.start_epoch`` (= saved epoch + 1;
    the saved epoch itself for a mid-epoch checkpoint, see ``resume_progress``) and this process's RNG states, so
    call it after everything that draws random numbers at start-up. A checkpoint that does not fit raises
    ``CheckpointMismatchError``. Returns the checkpoint dict (None when there is nothing to resume).
    """
    if not resolve_resume(args):
        return None
    checkpoint = load_checkpoint(args.resume, unsafe=getattr(args, "unsafe_load", False))
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{args.resume} is not a training checkpoint (no 'model' state dict)")
    check_state_dict(model_without_ddp, checkpoint["model"], args.resume)
    model_without_ddp.load_state_dict(checkpoint["model"])
    print(f"Resume checkpoint {args.resume}")
    if getattr(args, "eval", False) or checkpoint.get("optimizer") is None or "epoch" not in checkpoint:
        return checkpoint
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointMismatchError(
            f"{args.resume}: its optimizer state does not fit this run's optimizer ({err}); it was written by "
            "another script or optimizer setup. To start from its weights only, pass it to --finetune"
        ) from err
    if loss_scaler is not None and checkpoint.get("scaler") is not None:
        loss_scaler.load_state_dict(checkpoint["scaler"])
    # a checkpoint saved on a stop signal mid-epoch continues that epoch (see resume_progress)
    args.start_epoch = checkpoint["epoch"] + (0 if checkpoint.get(PROGRESS_KEY) else 1)
    rng = checkpoint.get("rng")
    rank = get_rank()
    if rng is not None and len(rng) == get_world_size():
        set_rng_state(rng[rank])
    else:
        print("Checkpoint RNG states do not match this world size; reseeding from (seed, epoch, rank)")
        seed_everything(epoch_seed(args.seed, args.start_epoch, rank))
    print(f"With optimizer and scaler; continuing at epoch {args.start_epoch}")
    return checkpoint


# --------------------------------------------------------------------------------------------------------------
# command line, run setup, data loaders, logs


def parse_model_kwargs(items) -> dict:
    """``['depth=2', 'embed_dim=64', 'qkv_bias=False']`` -> dict; values parsed as Python literals, else strings."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--model_kwargs expects key=value, got '{item}'")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


class FloatListAction(argparse.Action):
    """``--mean 1 2 3`` or ``--mean 1,2,3`` -> [1.0, 2.0, 3.0]."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            floats = [float(v) for value in values for v in str(value).split(",") if v.strip()]
        except ValueError:
            parser.error(f"{option_string} expects numbers, got {' '.join(values)}")
        setattr(namespace, self.dest, floats)


def add_reading_args(group):
    """``--channel_axis`` and ``--nan_fill``: how pixels are read, for every script that reads data."""
    group.add_argument(
        "--channel_axis",
        default=None,
        choices=["first", "last"],
        help="channel axis of 3-D TIFF/NPY arrays: first (C, H, W) or last (H, W, C) (default: from each file's "
        "shape; a shape that fits both or neither, such as 64x64x64, is an error)",
    )
    group.add_argument(
        "--nan_fill",
        default=None,
        type=float,
        metavar="VALUE",
        help="replace NaN and infinite pixels by VALUE (raw units) when reading (default: such a file is an error)",
    )


def add_common_args(parser: argparse.ArgumentParser):
    """Flags shared by main_pretrain, main_finetune and main_linprobe (data, runtime, checkpoints, distributed)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default=None, type=str, help="dataset root (class folders) or a CSV index")
    g.add_argument("--input_size", default=224, type=int, help="image size (square)")
    g.add_argument("--in_chans", default=None, type=int, help="number of input channels (default: from the data)")
    g.add_argument("--channels", default=None, type=str, help="channel ids to read, e.g. '0,2,4' (default: all)")
    order = (
        "in raw units: one value per channel of the files, in file order also when --channels reorders them, or "
        "one per --channels id, in --channels order, when --channels picks fewer channels"
    )
    g.add_argument("--mean", default=None, nargs="+", action=FloatListAction, help=f"per-channel mean {order}")
    g.add_argument("--std", default=None, nargs="+", action=FloatListAction, help=f"per-channel std {order}")
    g.add_argument("--channel_stats", default=None, type=str, help="JSON with per-channel mean/std")
    g.add_argument(
        "--scale",
        default=None,
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="training crop area range (default: 0.2 1 pretraining, 0.08 1 fine-tuning)",
    )
    g.add_argument("--hflip", default=0.5, type=float, metavar="P", help="training horizontal flip probability")
    g.add_argument("--vflip", action="store_true", help="add random vertical flips to training augmentation")
    g.add_argument("--allow_mixed_sizes", action="store_true", help="allow images of different sizes")
    g.add_argument("--skip_bad_samples", action="store_true", help="skip unreadable files instead of failing")
    add_reading_args(g)

    g = parser.add_argument_group("runtime")
    g.add_argument("--output_dir", default="./output_dir", help="where checkpoints and log.txt go ('' = nowhere)")
    g.add_argument("--log_dir", default=None, help="TensorBoard directory (default: --output_dir)")
    g.add_argument("--device", default=default_device(), help="'cuda' (when available) or 'cpu'")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="resume from this checkpoint")
    g.add_argument("--auto_resume", action="store_true", help="resume from the newest checkpoint in --output_dir")
    g.add_argument("--unsafe_load", action="store_true", help="torch.load with weights_only=False (trusted files)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (set by --resume)")
    g.add_argument("--save_every", default=20, type=int, help="also keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--num_workers", default=min(10, os.cpu_count() or 1), type=int)
    g.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader (CUDA only)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    g.add_argument("--print_freq", default=20, type=int, help="log every N iterations")
    g.add_argument(
        "--amp",
        default=None,
        choices=sorted(AMP_DTYPES),
        help="autocast dtype (default: bf16/fp16 on CUDA, none on CPU)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad_checkpointing", action="store_true", help="activation checkpointing in the blocks")

    g = parser.add_argument_group("distributed")
    g.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int)
    g.add_argument("--dist_on_itp", action="store_true", help="OpenMPI launcher (OMPI_COMM_WORLD_* variables)")
    g.add_argument("--dist_url", default="env://", help="rendezvous URL for torch.distributed")
    return parser


def setup_run(args) -> torch.device:
    """Join the process group, pick the device and AMP mode, seed (seed + rank), create the output dirs and check
    that they are writable, and (rank 0, unless ``--eval``) make this run the owner of ``--output_dir``
    (``lock_output_dir``, ``check_new_or_resumed``); ``OutputError`` before any training otherwise."""
    init_distributed_mode(args)
    if args.log_dir is None:
        args.log_dir = args.output_dir
    device = torch.device(args.device)
    args.amp = resolve_amp(args.amp, device)
    seed_everything(args.seed + get_rank())
    if is_main_process():
        for flag, path in (("--output_dir", args.output_dir), ("--log_dir", args.log_dir)):
            if path:
                check_writable(path, flag)
        if args.output_dir and not getattr(args, "eval", False):
            lock_output_dir(args.output_dir)
            check_new_or_resumed(args)
    print(f"job dir: {os.path.dirname(os.path.dirname(os.path.realpath(__file__)))}")
    print(json.dumps(args_to_dict(args), indent=1))
    return device


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


class EpochSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` that can begin an epoch part-way: it skips the first ``start`` indices of this
    process's shard (set by ``set_loader_epoch`` when resuming a mid-epoch checkpoint)."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def _worker_ignores_stop_signals(worker_id: int):
    """DataLoader ``worker_init_fn``: leave SIGTERM/SIGUSR1 to the main process, which saves and then ends the
    workers (Slurm and ``kill -- -pgid`` signal every process, and a worker killed by them would fail the loader)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world_size, ...``: every sample exactly once over all processes (no padding)."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.rank, self.num_replicas, self.size = rank, num_replicas, len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self):
        return self.num_samples


def build_train_loader(dataset, args, drop_last: bool = True):
    """Shuffling loader whose order depends only on (seed, epoch): call ``set_loader_epoch`` before each epoch.

    The order comes from a ``DistributedSampler`` (also with one process) and worker seeds from the loader's own
    generator, so neither draws from the global RNG. Too few samples for one batch per process, or for one
    optimizer step of ``--accum_iter`` batches, raise ``RunError``.
    """
    sampler = EpochSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and str(args.device).startswith("cuda"),
        drop_last=drop_last,
        generator=torch.Generator(),
        worker_init_fn=_worker_ignores_stop_signals,
    )
    if len(loader) == 0:
        raise RunError(
            f"{len(dataset)} training samples give no full batch of --batch_size {args.batch_size} per process "
            f"on {get_world_size()} process(es); lower --batch_size"
        )
    accum_iter = getattr(args, "accum_iter", 1)
    if len(loader) < accum_iter:
        raise RunError(
            f"an epoch has {len(loader)} batches of --batch_size {args.batch_size} ({len(dataset)} samples, "
            f"{get_world_size()} process(es)), fewer than --accum_iter {accum_iter}: no optimizer step would be taken"
        )
    return loader


def set_loader_epoch(loader, epoch: int, args, progress: dict | None = None):
    """Seed the shuffling and the worker RNGs of ``loader`` for ``epoch``; with the ``progress`` of a mid-epoch
    checkpoint (``resume_progress``) the epoch starts after the batches it had done."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = progress["step"] * loader.batch_size if progress else 0
    loader.generator.manual_seed(epoch_seed(args.seed, epoch, get_rank()))


def build_eval_loader(dataset, args):
    """Sequential loader; with ``--dist_eval`` every process scores a disjoint shard (``ShardSampler``)."""
    if getattr(args, "dist_eval", False) and get_world_size() > 1:
        sampler = ShardSampler(dataset, get_world_size(), get_rank())
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    generator = torch.Generator()
    generator.manual_seed(args.seed)
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and str(args.device).startswith("cuda"),
        drop_last=False,
        generator=generator,
        worker_init_fn=_worker_ignores_stop_signals,
    )


def num_known_channels(dataset) -> int:
    """Channels in the files (the dataset may read a subset, named by ``dataset.channel_ids``)."""
    return max(getattr(dataset, "num_channels", 0), max(dataset.channel_ids) + 1)


def describe_dataset(name: str, dataset) -> str:
    """One line: sample count, channels read, classes and where the normalisation came from."""
    classes = getattr(dataset, "classes", None)
    class_info = f", {len(classes)} classes" if classes else ""
    source = getattr(dataset, "norm_source", None)
    norm_info = f", normalised with {source}" if source else ""
    return f"{name}: {len(dataset)} samples, channels {list(dataset.channel_ids)}{class_info}{norm_info}"


def describe_optimizer(optimizer) -> str:
    """One line: optimizer class, lr and the size of its parameter groups."""
    groups = ", ".join(
        f"{sum(p.numel() for p in g['params'])} params wd={g.get('weight_decay', 0.0):g}"
        + (f" lr_scale={g['lr_scale']:.3g}" if "lr_scale" in g else "")
        for g in optimizer.param_groups
    )
    return f"{type(optimizer).__name__}(lr={optimizer.defaults['lr']:.3g}) groups: [{groups}]"


def scale_lr(args) -> int:
    """Set ``args.lr = args.blr * eff_batch / 256`` unless ``--lr`` was given; return the effective batch size."""
    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}, actual lr: {args.lr:.2e}")
    print(f"accumulate grad iterations: {args.accum_iter}, effective batch size: {eff_batch_size}")
    return eff_batch_size


def wrap_model(model, args, device):
    """(training module, evaluation module) for ``model``: DDP when distributed, ``torch.compile`` with
    ``--compile``. The evaluation module skips DDP, so processes may score different numbers of batches."""
    train_model = eval_model = model
    if args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None
        )
    if args.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(model)
    return train_model, eval_model


def open_log_writer(args):
    """A TensorBoard ``SummaryWriter`` on ``args.log_dir`` on rank 0, else None."""
    if not is_main_process() or not args.log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=args.log_dir)


def write_log(args, stats: dict, log_writer=None):
    """Append ``stats`` as one JSON line to ``output_dir/log.txt`` (rank 0) and flush the TensorBoard writer."""
    if log_writer is not None:
        log_writer.flush()
    if is_main_process() and args.output_dir:
        path = os.path.join(args.output_dir, "log.txt")
        try:
            with open(path, mode="a", encoding="utf-8") as f:
                f.write(json.dumps(stats) + "\n")
        except OSError as err:
            raise OutputError(f"could not append to {path}: {err}") from err


def skip_stats(dataset) -> dict:
    """With ``--skip_bad_samples``, for log.txt: the files dropped when ``dataset`` was built and the samples
    replaced since because they failed to decode (summed over processes and their DataLoader workers)."""
    if not getattr(dataset, "skip_bad_samples", False):
        return {}
    replaced = all_reduce_mean(float(dataset.num_skipped)) * get_world_size()
    return {"skipped_files": getattr(dataset, "num_dropped", 0), "replaced_samples": round(replaced)}
