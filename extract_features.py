"""Export encoder embeddings of every sample (pooled, and per channel for ChannelViT / ChannelMAE) to one .npz.

Works from a pretraining checkpoint (encoder only, nothing masked) or a fine-tuned / linear-probe classifier
(head dropped), ours or published. Optional k-NN accuracy (train split as memory, val split as queries) as a
cheap quality number, and per-group means (e.g. per well) from a regex on the file paths.

    python extract_features.py --resume output_dir/checkpoint-last.pth --data_path DIR --out features.npz
    python extract_features.py --resume ckpt.pth --data_path sample_data/digits --knn_k 20 --out digits.npz
    torchrun --nproc_per_node 4 extract_features.py --resume ckpt.pth --data_path DIR --out features.npz

Output arrays: features (N, D) float32 (--pool cls | mean of patch tokens); channel_features (N, C, D) (channel
models: mean of each channel's patch tokens); labels (N,) int64 (-1 unlabelled); paths (N,) str (a sample made
of one file per channel lists them joined by '|'); split (N,) str; classes, channel_ids, channel_names, model,
pool, checkpoint; with --knn_k: knn_top1, knn_top5 (percent), knn_k, knn_t, knn_pred (val rows, -1 elsewhere);
with --group_regex: groups (G,) str, group_features (G, D), group_counts (G,); metadata_columns (M,) str, the CSV
metadata columns (``Metadata_*``, ``--metadata_columns``, util/data/metadata.py), and for each one
``metadata_<column>`` (N,) str, its value per row, e.g. to group wells by plate. With --path_metadata
NAME=REGEX: one more column per name (metadata_NAME). --bag_of_channels makes features the bag-of-channels
embedding (N, V * D): each channel encoded on its own, concatenated in vocabulary order (V slots, missing
channels zero); --raw_pixels S makes them the normalised pixels resized to S x S and flattened (a baseline).
Either records feature_kind ('encoder', 'bag_of_channels' or 'raw_pixels').

Memory: features stream batch by batch into .npy memory maps under OUT.parts/ (one per process, merged by rank
0, then written into the .npz in chunks and deleted), so only paths, labels and k-NN/group bookkeeping are held
in RAM. With several processes OUT must be on a file system that every process sees. Each sample is
processed exactly once (strided shards, no padding duplicates).
"""

import os
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from engine_features import bag_of_channels, input_planes, raw_pixels, vocabulary_size
from models_checkpoint import model_from_checkpoint
from models_preflight import check_group_regex, check_model_channels, check_patch_grid
from util.amp import AMP_DTYPES, autocast
from util.cli import add_distributed_args, add_reading_args, parse_model_kwargs, run_main
from util.data.errors import DatasetError
from util.data.evaluation import SPLITS, eval_dataset, inherit_data_args
from util.data.metadata import concat_metadata
from util.distributed import (
    cleanup_distributed,
    default_device,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_dist_avail_and_initialized,
    is_main_process,
)
from util.errors import RunError
from util.features import (
    channel_rows,
    encode,
    group_means,
    is_channel_model,
    knn_accuracy,
    merge_shards,
    open_array,
)
from util.flags import ArgumentParser, regex
from util.loaders import ShardSampler
from util.output_dir import check_output_file

POOLS = ("mean", "cls")


def get_args_parser():
    parser = ArgumentParser("Encoder feature export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", required=True, help="pretraining or classifier checkpoint (file or model folder)")
    parser.add_argument("--out", default="features.npz", help="output .npz")
    parser.add_argument("--pool", default="mean", choices=POOLS, help="class token or mean of the patch tokens")
    parser.add_argument("--batch_size", default=64, type=int, help="batch size per process")
    parser.add_argument("--knn_k", default=0, type=int, help="k-NN accuracy with k neighbours (0 = off)")
    parser.add_argument("--knn_t", default=0.07, type=float, help="k-NN vote temperature")
    parser.add_argument(
        "--group_regex",
        default=None,
        type=regex,
        help="also average per group: regex on the file path; group 1 (else the match) names it",
    )
    parser.add_argument(
        "--path_metadata",
        default=[],
        nargs="*",
        metavar="NAME=REGEX",
        help="metadata column NAME from a regex on each sample's path (group 1, else the match), e.g. plate='(P\\d+)_'",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--bag_of_channels",
        action="store_true",
        help="features = each channel encoded on its own, concatenated in vocabulary order (needed for encoders "
        "pretrained with --bag_of_channels)",
    )
    kind.add_argument("--raw_pixels", default=0, type=int, metavar="SIZE", help="features = pixels at SIZE x SIZE")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="model name (required for published files without 'args')")
    g.add_argument("--model_kwargs", default=[], nargs="*", metavar="KEY=VALUE", help="e.g. num_heads=2")
    g.add_argument("--input_size", default=None, type=int, help="default: the checkpoint's")
    g.add_argument("--unsafe_load", action="store_true", help="full unpickling (trusted files only)")
    g.add_argument("--device", default=default_device())
    g.add_argument("--amp", default="none", choices=sorted(AMP_DTYPES), help="autocast dtype")
    g.add_argument("--num_workers", default=min(8, os.cpu_count() or 1), type=int)
    g = parser.add_argument_group("data (default: the checkpoint's flags)")
    g.add_argument("--data_path", default=None)
    g.add_argument(
        "--split",
        default=None,
        choices=[*SPLITS, "trainval"],
        help="default: trainval with --knn_k, else pretrain (the pretraining layout, labels -1)",
    )
    g.add_argument(
        "--channels", default=None, help="channels to read by name or file position, e.g. 'DNA,Mito' or '0,2,4'"
    )
    g.add_argument("--mean", default=None, type=float, nargs="+")
    g.add_argument("--std", default=None, type=float, nargs="+")
    g.add_argument("--channel_stats", default=None)
    add_reading_args(g)
    g.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="leave out files found unreadable when the dataset is built (a later decode failure is still an error: "
        "a replacement sample would not match its row's path)",
    )
    add_distributed_args(parser)
    return parser


def has_channel_features(model, args):
    return is_channel_model(model) and not (args.bag_of_channels or args.raw_pixels)


def feature_dim(model, channel_ids, args):
    if args.raw_pixels:
        return len(channel_ids) * args.raw_pixels**2
    return model.cls_token.shape[-1] * (args.vocabulary if args.bag_of_channels else 1)


def feature_kind(args):
    return "raw_pixels" if args.raw_pixels else "bag_of_channels" if args.bag_of_channels else "encoder"


def embed(model, imgs, channel_ids, args):
    """imgs (N, C, H, W) -> (features (N, F), per-channel features (N, C, D) or None)."""
    if args.raw_pixels:
        return raw_pixels(imgs, args.raw_pixels), None
    if args.bag_of_channels:
        return bag_of_channels(model, imgs, channel_ids, args.vocabulary, args.pool), None
    return encode(model, imgs, channel_ids, args.pool)


def parse_path_metadata(items):
    """['plate=(P\\d+)_', ...] -> {name: compiled regex}; ``RunError`` naming a malformed item."""
    patterns = {}
    for item in items:
        name, sep, regex = item.partition("=")
        if not sep or not name.isidentifier():
            raise RunError(f"--path_metadata expects NAME=REGEX with NAME a plain identifier, got '{item}'")
        try:
            patterns[name] = re.compile(regex)
        except re.error as e:
            raise RunError(f"--path_metadata {name}: bad regex {regex!r}: {e}") from e
    return patterns


def path_metadata(patterns, paths):
    """{name: (N,) str} from the regexes on every path; ``RunError`` naming the first path one does not match."""
    columns = {}
    for name, pattern in patterns.items():
        values = []
        for path in paths:
            match = pattern.search(path)
            if match is None:
                raise RunError(f"--path_metadata {name}={pattern.pattern!r} does not match {path}")
            values.append(match.group(1) if pattern.groups else match.group(0))
        columns[name] = values
    return columns


def sample_path(files):
    return files if isinstance(files, str) else "|".join(files)


def extract(model, dataset, channel_ids, args, device, parts):
    """Write this rank's rows (indices rank, rank + W, ...) of features / channel_features into parts/."""
    rank, world_size = get_rank(), get_world_size()
    sampler = ShardSampler(dataset, world_size, rank)
    n = len(sampler)
    if n == 0:
        return
    prefix = f"rank{rank}." if world_size > 1 else ""
    D = model.cls_token.shape[-1]
    features = open_array(os.path.join(parts, f"{prefix}features.npy"), (n, feature_dim(model, channel_ids, args)))
    per_channel = None
    if has_channel_features(model, args):
        per_channel = open_array(os.path.join(parts, f"{prefix}channel_features.npy"), (n, len(channel_ids), D))
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    start, row = time.time(), 0
    for step, (imgs, _) in enumerate(loader):
        imgs = imgs.to(device, non_blocking=True)
        with autocast(device, args.amp):
            pooled, channels = embed(model, imgs, channel_ids, args)
        features[row : row + len(imgs)] = pooled.cpu().numpy()
        if per_channel is not None:
            per_channel[row : row + len(imgs)] = channels.cpu().numpy()
        row += len(imgs)
        if step % 50 == 0 or row == n:
            print(f"[rank {rank}] {row}/{n} samples, {time.time() - start:.1f}s", force=True)
    features.flush()
    if per_channel is not None:
        per_channel.flush()


def write_npz(path, arrays):
    """np.savez through a temporary file and a rename; memory-mapped arrays are copied in chunks."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def main(args):
    split = args.split or ("trainval" if args.knn_k else "pretrain")
    if args.knn_k and split != "trainval":
        raise RunError("--knn_k needs --split trainval (train split as memory, val split as queries)")
    patterns = parse_path_metadata(args.path_metadata)
    init_distributed_mode(args)
    device = torch.device(args.device)
    overrides = parse_model_kwargs(args.model_kwargs)
    model, info = model_from_checkpoint(
        args.resume, model=args.model, input_size=args.input_size, unsafe=args.unsafe_load, **overrides
    )
    if info["kind"] == "pretrain" and is_channel_model(model):
        model.mask_mode = "independent"  # mask ratio 0 keeps every token only in this mode
    if info["args"].get("bag_of_channels") and not (args.bag_of_channels or args.raw_pixels):
        raise RunError(f"{args.resume} was pretrained with --bag_of_channels (one channel at a time): pass it here too")
    model.to(device)
    if args.input_size:
        check_patch_grid(args.input_size, model.patch_embed.patch_size[0], f"from {args.resume}")
    inherit_data_args(args, info["args"], model)
    check_output_file(args.out, "--out")
    stats = info["args"].get("normalization")
    datasets = [eval_dataset(args, s, stats) for s in (("train", "val") if split == "trainval" else (split,))]
    for d in datasets:
        d.skip_bad_samples = False  # each row must be the features of its path
        if not (args.raw_pixels or (args.bag_of_channels and input_planes(model) == 1)):
            check_model_channels(model, d, args.channels)  # a BoC encoder takes one plane of any dataset
    if args.group_regex:
        check_group_regex(args.group_regex, [sample_path(files) for d in datasets for files, _ in d.samples])
    dataset = torch.utils.data.ConcatDataset(datasets)
    channel_ids = torch.as_tensor(channel_rows(datasets, info, args.resume, model), device=device)
    args.vocabulary = vocabulary_size(model, datasets[0])
    metadata = concat_metadata(datasets)
    columns = path_metadata(patterns, [sample_path(files) for d in datasets for files, _ in d.samples])
    if set(columns) & set(metadata):
        raise RunError(f"--path_metadata names {sorted(set(columns) & set(metadata))} are CSV metadata columns already")
    metadata |= columns
    print(f"{info['name']} ({info['kind']}, {args.resume}): {len(dataset)} samples, channels {channel_ids.tolist()}")

    parts = args.out + ".parts"
    if is_main_process():
        shutil.rmtree(parts, ignore_errors=True)
        os.makedirs(parts)
    if is_dist_avail_and_initialized():
        dist.barrier()
    extract(model, dataset, channel_ids, args, device, parts)
    if is_dist_avail_and_initialized():
        dist.barrier()
    if not is_main_process():
        cleanup_distributed()
        return None

    N, D, C, W = len(dataset), model.cls_token.shape[-1], len(channel_ids), get_world_size()
    names = ["features", "channel_features"] if has_channel_features(model, args) else ["features"]
    shapes = {"features": (N, feature_dim(model, channel_ids, args)), "channel_features": (N, C, D)}
    if W > 1:
        arrays = {name: merge_shards(parts, name, shapes[name], W) for name in names}
    else:
        arrays = {name: np.load(os.path.join(parts, f"{name}.npy"), mmap_mode="r") for name in names}
    samples = [s for d in datasets for s in d.samples]
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    paths = np.asarray([sample_path(files) for files, _ in samples])
    split_names = np.repeat(["train", "val"] if split == "trainval" else [split], [len(d) for d in datasets])
    arrays.update(
        labels=labels,
        paths=paths,
        split=split_names,
        classes=np.asarray(datasets[0].classes, dtype=str),
        channel_ids=np.asarray(channel_ids.tolist(), dtype=np.int64),
        channel_names=np.asarray(datasets[0].read_names, str),
        model=np.asarray(info["name"]),
        pool=np.asarray(args.pool),
        checkpoint=np.asarray(os.path.abspath(args.resume)),
        feature_kind=np.asarray(feature_kind(args)),
    )
    arrays.update({f"metadata_{column}": np.asarray(values, dtype=str) for column, values in metadata.items()})
    arrays["metadata_columns"] = np.asarray(list(metadata), dtype=str)
    if args.knn_k:
        top1, top5, query_rows, pred = knn_accuracy(
            arrays["features"],
            labels,
            split_names == "train",
            split_names == "val",
            len(datasets[0].classes),
            args.knn_k,
            args.knn_t,
        )
        knn_pred = np.full(N, -1, dtype=np.int64)
        knn_pred[query_rows] = pred
        arrays.update(knn_top1=top1, knn_top5=top5, knn_k=args.knn_k, knn_t=args.knn_t, knn_pred=knn_pred)
        print(f"k-NN (k={args.knn_k}, T={args.knn_t}, {args.pool} pool): top-1 {top1:.2f}%  top-5 {top5:.2f}%")
    if args.group_regex:
        groups, group_features, counts = group_means(arrays["features"], paths, args.group_regex)
        arrays.update(groups=groups, group_features=group_features, group_counts=counts)
        print(f"{len(groups)} groups by {args.group_regex!r}")
    write_npz(args.out, arrays)
    del arrays
    shutil.rmtree(parts, ignore_errors=True)
    F = feature_dim(model, channel_ids, args)
    print(f"wrote {args.out}: features {N}x{F}" + (f", channel_features {N}x{C}x{D}" if C and len(names) > 1 else ""))
    cleanup_distributed()
    return args.out


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args(), errors=(DatasetError,))
