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


class SourceBatchSampler(torch.utils.data.Sampler):
    """Batches of one source each, for a ``util.data.sources.MixedDataset``: every process draws the same sequence
    of sources, each step a ``batch_size`` slice of one global batch of ``batch_size x num_replicas`` samples.

    Per epoch (``set_epoch``) and ``seed``: every source's indices are shuffled (fresh permutations appended while a
    weight above 1 asks for more), cut into ``floor(weight x size / (batch_size x num_replicas))`` global batches
    (the remainder is dropped, as with ``drop_last``), and the batches of all sources are interleaved in one
    shuffled order. That order is the same on every process, so every process gets the same number of batches,
    all of the same source at a step. ``start`` skips the first batches (a mid-epoch resume).
    """

    def __init__(self, sizes, batch_size: int, num_replicas: int, rank: int, seed: int, weights=None):
        self.sizes, self.batch_size = list(sizes), batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.weights = list(weights) if weights is not None else [1.0] * len(self.sizes)
        self.offsets = [sum(self.sizes[:s]) for s in range(len(self.sizes))]
        span = batch_size * num_replicas
        self.counts = [int(w * n // span) for w, n in zip(self.weights, self.sizes)]
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _epoch_batches(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        span = self.batch_size * self.num_replicas
        per_source = []
        for size, count, offset in zip(self.sizes, self.counts, self.offsets):
            drawn = []
            while len(drawn) < count * span:
                drawn += torch.randperm(size, generator=generator).tolist()
            mine = [offset + i for i in drawn[: count * span]]
            lo = self.rank * self.batch_size
            per_source.append(iter([mine[k * span + lo : k * span + lo + self.batch_size] for k in range(count)]))
        order = torch.cat([torch.full((n,), s) for s, n in enumerate(self.counts)])
        for s in order[torch.randperm(len(order), generator=generator)].tolist():
            yield next(per_source[s])

    def __iter__(self):
        return itertools.islice(self._epoch_batches(), self.start, None)

    def __len__(self):
        return sum(self.counts) - self.start


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
    signals to the main process; ``generator`` seeds the workers. A ``SourceBatchSampler`` makes the batches."""
    batching = (
        dict(batch_sampler=sampler)
        if isinstance(sampler, SourceBatchSampler)
        else dict(sampler=sampler, batch_size=args.batch_size, drop_last=drop_last)
    )
    return torch.utils.data.DataLoader(
        dataset,
        **batching,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and str(args.device).startswith("cuda"),
        generator=generator,
        collate_fn=getattr(dataset, "collate_fn", None),
        worker_init_fn=_worker_ignores_stop_signals,
    )


def build_train_loader(dataset, args, drop_last: bool = True):
    """Shuffling loader whose order depends only on (seed, epoch): call ``set_loader_epoch`` before each epoch.

    The order comes from a ``DistributedSampler`` (also with one process), or for a dataset of several sources
    (``sizes``, ``weights``: ``util.data.sources.MixedDataset``) from a ``SourceBatchSampler``; worker seeds come
    from the loader's own generator, so neither draws from the global RNG. Too few samples for one batch per
    process, or for one optimizer step of ``--accum_iter`` batches, raise ``RunError``.
    """
    if hasattr(dataset, "sizes"):
        sampler = SourceBatchSampler(
            dataset.sizes, args.batch_size, get_world_size(), get_rank(), args.seed, dataset.weights
        )
        empty = [n for n, c in zip(dataset.source_names, sampler.counts) if c == 0]
        if empty:
            raise RunError(
                f"source(s) {', '.join(empty)} give no full batch of --batch_size {args.batch_size} per process on "
                f"{get_world_size()} process(es); lower --batch_size or raise their weight"
            )
    else:
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
    if isinstance(loader.batch_sampler, SourceBatchSampler):
        loader.batch_sampler.set_epoch(epoch)
        loader.batch_sampler.start = progress["step"] if progress else 0
    else:
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
