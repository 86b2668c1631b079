"""Training metrics: smoothed meters, the progress printer, on-device loss tracking, log.txt, TensorBoard (and W&B)."""

import datetime
import json
import os
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from util.distributed import (
    all_reduce_mean,
    get_world_size,
    is_dist_avail_and_initialized,
    is_main_process,
    reduction_device,
)
from util.errors import OutputError
from util.wandb_writer import LogWriters, WandbWriter


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
    checkpoint is written after it, so ``checkpoint-last.pth`` holds the last good state. With ``source_names``
    (a multi-source run) each step's loss is also summed per source, reported as ``loss_<source>``.
    """

    def __init__(self, device: torch.device, epoch: int, source_names=None):
        self.epoch = epoch
        self.device = device
        self.source_names = list(source_names or [])
        self.source_sum = torch.zeros(len(self.source_names), dtype=torch.float64, device=device)
        self.source_count = [0] * len(self.source_names)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.count = 0
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm_count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, loss: torch.Tensor, step: int, grad_norm: torch.Tensor | None = None, source=None):
        """Add the loss of ``step`` (of source index ``source``, if any) and, on optimizer steps, its gradient norm
        (None on accumulation steps)."""
        loss = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0)
        if source is not None and self.source_names:
            self.source_sum[source] += torch.where(finite, loss, 0.0)
            self.source_count[source] += 1
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
        totals = torch.stack([self.loss_sum, count, self.grad_norm_sum, self.grad_norm_count])
        stats = torch.cat([totals, self.source_sum])
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
        loss_sum, count, grad_norm_sum, grad_norm_count, *source_sums = stats.tolist()
        meters = {"loss": (loss_sum / count, self.count)}
        world_size = get_world_size()  # every process trains the same source at a step
        for name, total, steps in zip(self.source_names, source_sums, self.source_count):
            if steps:
                meters[f"loss_{name}"] = (total / (steps * world_size), steps)
        if grad_norm_count:  # every process steps together, so each holds 1 / world size of the count
            meters["grad_norm"] = (grad_norm_sum / grad_norm_count, round(grad_norm_count / get_world_size()))
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.grad_norm_count.zero_()
        self.source_sum.zero_()
        self.source_count = [0] * len(self.source_names)
        self.count = 0
        return meters


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


def open_log_writer(args):
    """On rank 0: a TensorBoard ``SummaryWriter`` on ``args.log_dir`` and, with ``--wandb``, a W&B run, both behind
    one writer (``util.wandb_writer``); None elsewhere or with neither."""
    if not is_main_process():
        return None
    writers = []
    if args.log_dir:
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(log_dir=args.log_dir))
    if getattr(args, "wandb", None):
        writers.append(WandbWriter(args))
    if len(writers) < 2:
        return writers[0] if writers else None
    return LogWriters(writers)


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
