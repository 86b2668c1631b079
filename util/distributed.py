"""Process group: launcher environments (torchrun, Slurm, ITP), init and cleanup, rank helpers, DDP wrapping."""

import builtins
import datetime
import os

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


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
