"""Command lines: shared flag groups, run setup and teardown, one-line descriptions, ``ERROR:`` exits."""

import argparse
import ast
import datetime
import json
import multiprocessing
import os
import re
import sys
import time

import torch

from util.amp import AMP_DTYPES, resolve_amp
from util.checkpoint import args_to_dict
from util.distributed import cleanup_distributed, default_device, get_rank, init_distributed_mode, is_main_process
from util.errors import RunError
from util.fast_paths import enable_fast_paths
from util.loaders import default_num_workers
from util.metric_log import NonFiniteLossError
from util.output_dir import check_new_or_resumed, check_writable, lock_output_dir, release_output_dir
from util.preemption import TrainingStopped, restore_stop_handlers
from util.rng import seed_everything
from util.wandb_writer import check_wandb


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


class PathsAction(argparse.Action):
    """``--data_path A`` -> 'A'; ``--data_path A B`` -> ['A', 'B'] (several sources)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def add_reading_args(group):
    """``--channel_axis``, ``--nan_fill`` and ``--channel_names``: how pixels are read and what their channels are
    called, for every script that reads data."""
    group.add_argument(
        "--channel_names",
        default=None,
        metavar="A,B,C",
        help="names of the files' channels, in file order (default: the CSV's channel columns, channels.txt in the "
        "data root, else positional names ch0, ch1, ...); a checkpoint maps channels by these names",
    )
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
    group.add_argument(
        "--metadata_columns",
        default=None,
        metavar="COLUMNS",
        help="CSV columns that are per-sample metadata, not channels, e.g. 'plate,well' (always: Metadata_* "
        "columns, and in a CSV with a 'path' column every column but path and label); kept in extracted features",
    )


def add_data_args(parser: argparse.ArgumentParser):
    """The training scripts' "data" flags: where the data is, its channels, normalisation and augmentation."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data_path",
        default=None,
        nargs="+",
        action=PathsAction,
        metavar="PATH",
        help="dataset root (class folders) or a CSV index; pretraining, fine-tuning and the linear probe also take "
        "several (roots or CSVs) or a data-mix .json, one source each (util.data.sources)",
    )
    g.add_argument("--input_size", default=224, type=int, help="image size (square)")
    g.add_argument("--in_chans", default=None, type=int, help="number of input channels (default: from the data)")
    g.add_argument(
        "--channels",
        default=None,
        type=str,
        help="channels to read, in this order, by name or file position, e.g. 'DNA,Mito' or '0,2,4' (default: all)",
    )
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


def add_runtime_args(parser: argparse.ArgumentParser):
    """The training scripts' "runtime" flags: output, device, seed, resuming, loaders, logging, AMP, compile."""
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
    g.add_argument(
        "--num_workers",
        default=default_num_workers(),
        type=int,
        help="DataLoader workers per process (default: usable cores / processes per node - 1, at most 16)",
    )
    g.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader (CUDA only)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    g.add_argument("--print_freq", default=20, type=int, help="log every N iterations")
    g.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="also log to this Weights & Biases project (needs `pip install wandb`; WANDB_MODE=offline works offline)",
    )
    g.add_argument("--wandb_name", default=None, metavar="NAME", help="W&B run name (default: W&B's)")
    g.add_argument(
        "--amp",
        default=None,
        choices=sorted(AMP_DTYPES),
        help="autocast dtype (default: bf16/fp16 on CUDA, none on CPU)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no_fast_paths", action="store_true", help="no TF32, cudnn.benchmark, fused AdamW on CUDA")
    g.add_argument("--grad_checkpointing", action="store_true", help="activation checkpointing in the blocks")


def add_distributed_args(parser: argparse.ArgumentParser):
    """The "distributed" flags of every script that may run under a launcher (torchrun, Slurm, ITP)."""
    g = parser.add_argument_group("distributed")
    g.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int)
    g.add_argument("--dist_on_itp", action="store_true", help="OpenMPI launcher (OMPI_COMM_WORLD_* variables)")
    g.add_argument("--dist_url", default="env://", help="rendezvous URL for torch.distributed")


def add_common_args(parser: argparse.ArgumentParser):
    """Flags shared by main_pretrain, main_finetune and main_linprobe (data, runtime, checkpoints, distributed)."""
    add_data_args(parser)
    add_runtime_args(parser)
    add_distributed_args(parser)
    return parser


def setup_run(args) -> torch.device:
    """Refuse ``--wandb`` without the wandb package, join the process group, pick the device and AMP mode, seed
    (seed + rank), create the output dirs and check that they are writable, and (rank 0, unless ``--eval``) make this
    run the owner of ``--output_dir`` (``lock_output_dir``, ``check_new_or_resumed``); ``OutputError`` before any
    training otherwise."""
    check_wandb(args)
    init_distributed_mode(args)
    if args.log_dir is None:
        args.log_dir = args.output_dir
    device = torch.device(args.device)
    args.amp = resolve_amp(args.amp, device)
    enable_fast_paths(device, not getattr(args, "no_fast_paths", False))
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


def end_training(start_time: float, log_writer=None):
    """After the last epoch: print the training time, close TensorBoard, restore the signal handlers, give up the
    ``--output_dir`` lock and leave the process group."""
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if log_writer is not None:
        log_writer.close()
    restore_stop_handlers()
    release_output_dir()
    cleanup_distributed()


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
