"""Convert one or more datasets of any supported layout into a packed store made for random access.

    python pack_dataset.py --data_path SRC [SRC ...] --out DST
    python main_pretrain.py --data_path DST --gpu_augment ...

The store (``util.data.packed``) holds the pixels uncompressed in memory-mapped .npy arrays, one per sample shape
and dtype, with an index of samples and labels, the channel names and the train split's statistics; a crop reads
only the bytes of its window. Labelled sources (train and val splits) pack both splits; others pack their
pretraining samples as the train split. Packing streams one sample at a time and can be interrupted: rerunning
the same command resumes where it stopped (a finished store is left as it is).
"""

from util.cli import add_reading_args, run_main
from util.data.config import DataConfig
from util.data.errors import DatasetError
from util.data.pack import plan_store, write_store
from util.flags import ArgumentParser


def get_args_parser():
    parser = ArgumentParser("Pack datasets into a memory-mapped store", description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True, nargs="+", metavar="SRC", help="dataset roots or CSV indexes")
    parser.add_argument("--out", required=True, metavar="DST", help="store folder (new, empty, or a store to resume)")
    parser.add_argument("--allow_mixed_sizes", action="store_true", help="allow images of different sizes")
    parser.add_argument("--skip_bad_samples", action="store_true", help="leave out samples whose headers are corrupt")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_reading_args(parser)
    return parser


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3f} GiB"


def main(args):
    config = DataConfig(
        allow_mixed_sizes=args.allow_mixed_sizes,
        skip_bad_samples=args.skip_bad_samples,
        channel_axis=args.channel_axis,
        nan_fill=args.nan_fill,
    )
    plan = plan_store(args.data_path, config)
    counts = ", ".join(f"{name} {len(split['samples'])}" for name, split in plan.splits.items())
    print(f"{len(plan.sources)} source(s): {counts} samples of {plan.num_channels} channels -> {args.out}")
    summary = write_store(plan, args.out, config, progress=not args.no_progress)
    if summary["was_complete"]:
        print(f"{args.out} is complete already; nothing to do")
    elif not summary["fresh"]:
        print(f"resumed: {summary['resumed_from']} samples had been packed before")
    print(
        f"packed {sum(summary['samples'].values())} samples in {summary['groups']} array(s): "
        f"{_gib(summary['source_bytes'])} of source files -> {_gib(summary['store_bytes'])} store, "
        f"{summary['seconds']:.1f} s"
    )


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args(), errors=(DatasetError,))
