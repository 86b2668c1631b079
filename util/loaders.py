"""Samplers and DataLoaders: (seed, epoch)-determined training order, sharded evaluation, mid-epoch starts.

Loader defaults: ``--num_workers`` = the cores this process may use (its CPU affinity, which Slurm and taskset
restrict) shared among the processes of the node (``LOCAL_WORLD_SIZE``), less one for the training loop, at most
16; pinned memory on CUDA; torch's prefetch of 2 batches per worker (a batch of raw crop windows from
``--gpu_augment`` can be large). Workers are not persistent: a new set each epoch takes the epoch's seed
(``set_loader_epoch``), which persistent workers would not, so a resumed run would draw other crops.
"""

import itertools
import os
import signal

import torch

from util.distributed import get_rank, get_world_size
from util.errors import RunError
from util.preemption import STOP_SIGNALS
from util.rng import epoch_seed


def default_num_workers() -> int:
    """DataLoader workers per process: usable cores / processes on this node - 1, between 0 and 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(16, per_process - 1))


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


def _loader(dataset, sampler, args, drop_last: bool, generator: torch.Generator):
    """A DataLoader of ``--batch_size`` / ``--num_workers`` (pinned memory on CUDA) whose workers leave the stop
    signals to the main process; ``generator`` seeds the workers."""
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and str(args.device).startswith("cuda"),
        drop_last=drop_last,
        generator=generator,
        collate_fn=getattr(dataset, "collate_fn", None),
        worker_init_fn=_worker_ignores_stop_signals,
    )


def build_train_loader(dataset, args, drop_last: bool = True):
    """Shuffling loader whose order depends only on (seed, epoch): call ``set_loader_epoch`` before each epoch.

    The order comes from a ``DistributedSampler`` (also with one process) and worker seeds from the loader's own
    generator, so neither draws from the global RNG. Too few samples for one batch per process, or for one
    optimizer step of ``--accum_iter`` batches, raise ``RunError``.
    """
    sampler = EpochSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=args.seed)
    loader = _loader(dataset, sampler, args, drop_last, torch.Generator())
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
    return _loader(dataset, sampler, args, False, generator)
