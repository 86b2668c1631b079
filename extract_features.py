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
with --group_regex: groups (G,) str, group_features (G, D), group_counts (G,).

Memory: features stream batch by batch into .npy memory maps under OUT.parts/ (one per process, merged by rank
0, then written into the .npz in chunks and deleted), so only paths, labels and k-NN/group bookkeeping are held
in RAM. With several processes OUT must be on a file system that every process sees. Each sample is
processed exactly once (strided shards, no padding duplicates).
"""

import argparse
import os
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

import util.misc as misc
from util.checkpoint_io import model_from_checkpoint
from util.data.errors import DatasetError
from util.data.evaluation import SPLITS, eval_dataset, inherit_data_args

POOLS = ("mean", "cls")
CHUNK_ROWS = 4096


def get_args_parser():
    parser = argparse.ArgumentParser("Encoder feature export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", required=True, help="pretraining or classifier checkpoint")
    parser.add_argument("--out", default="features.npz", help="output .npz")
    parser.add_argument("--pool", default="mean", choices=POOLS, help="class token or mean of the patch tokens")
    parser.add_argument("--batch_size", default=64, type=int, help="batch size per process")
    parser.add_argument("--knn_k", default=0, type=int, help="k-NN accuracy with k neighbours (0 = off)")
    parser.add_argument("--knn_t", default=0.07, type=float, help="k-NN vote temperature")
    parser.add_argument(
        "--group_regex",
        default=None,
        help="also average per group: regex on the file path; group 1 (else the match) names it",
    )
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="model name (required for published files without 'args')")
    g.add_argument("--model_kwargs", default=[], nargs="*", metavar="KEY=VALUE", help="e.g. num_heads=2")
    g.add_argument("--input_size", default=None, type=int, help="default: the checkpoint's")
    g.add_argument("--unsafe_load", action="store_true", help="full unpickling (trusted files only)")
    g.add_argument("--device", default=misc.default_device())
    g.add_argument("--amp", default="none", choices=sorted(misc.AMP_DTYPES), help="autocast dtype")
    g.add_argument("--num_workers", default=min(8, os.cpu_count() or 1), type=int)
    g = parser.add_argument_group("data (default: the checkpoint's flags)")
    g.add_argument("--data_path", default=None)
    g.add_argument(
        "--split",
        default=None,
        choices=[*SPLITS, "trainval"],
        help="default: trainval with --knn_k, else pretrain (the pretraining layout, labels -1)",
    )
    g.add_argument("--channels", default=None, help="channel ids to read, e.g. '0,2,4'")
    g.add_argument("--mean", default=None, type=float, nargs="+")
    g.add_argument("--std", default=None, type=float, nargs="+")
    g.add_argument("--channel_stats", default=None)
    misc.add_reading_args(g)
    g.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="leave out files found unreadable when the dataset is built (a later decode failure is still an error: "
        "a replacement sample would not match its row's path)",
    )
    g = parser.add_argument_group("distributed (torchrun / Slurm environment)")
    g.add_argument("--dist_url", default="env://")
    g.add_argument("--dist_on_itp", action="store_true")
    g.add_argument("--world_size", default=1, type=int)
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int)
    return parser


def is_channel_model(model):
    return hasattr(model, "channel_embed")


@torch.no_grad()
def encode(model, imgs, channel_ids, pool):
    """imgs (N, C, H, W) -> (pooled (N, D), per-channel means (N, C, D) or None), float32.

    Pretraining models run `forward_encoder` with nothing masked (tokens come back shuffled and are put back in
    order with ids_restore); classifiers run `forward_features`, and apply `fc_norm` to token means when they
    were trained with global pooling. The class token is taken as the encoder gives it.
    """
    N, C = imgs.shape[:2]
    if hasattr(model, "forward_encoder"):
        latent, _, ids_restore = model.forward_encoder(imgs, 0.0, channel_ids)
        cls, tokens = latent[:, 0], latent[:, 1:]
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        post = torch.nn.Identity()
    else:
        x = model.forward_features(imgs, channel_ids) if is_channel_model(model) else model.forward_features(imgs)
        cls, tokens = x[:, 0], x[:, model.num_prefix_tokens :]
        post = model.fc_norm
    pooled = cls if pool == "cls" else post(tokens.mean(dim=1))
    per_channel = None
    if is_channel_model(model):
        per_channel = post(tokens.reshape(N, C, -1, tokens.shape[-1]).mean(dim=2)).float()
    return pooled.float(), per_channel


def sample_path(files):
    return files if isinstance(files, str) else "|".join(files)


def open_array(path, shape):
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def merge_shards(parts, name, shape, world_size):
    """Interleave the per-rank arrays parts/rank<r>.<name>.npy (rows r, r + W, ...) into parts/<name>.npy."""
    final = open_array(os.path.join(parts, f"{name}.npy"), shape)
    for rank in range(world_size):
        path = os.path.join(parts, f"rank{rank}.{name}.npy")
        if not os.path.exists(path):
            continue
        shard = np.load(path, mmap_mode="r")
        for k0 in range(0, len(shard), CHUNK_ROWS):
            k1 = min(k0 + CHUNK_ROWS, len(shard))
            final[rank + k0 * world_size : rank + (k1 - 1) * world_size + 1 : world_size] = shard[k0:k1]
        del shard
        os.remove(path)
    final.flush()
    return final


def extract(model, dataset, channel_ids, args, device, parts):
    """Write this rank's rows (indices rank, rank + W, ...) of features / channel_features into parts/."""
    rank, world_size = misc.get_rank(), misc.get_world_size()
    sampler = misc.ShardSampler(dataset, world_size, rank)
    n = len(sampler)
    if n == 0:
        return
    prefix = f"rank{rank}." if world_size > 1 else ""
    D = model.cls_token.shape[-1]
    features = open_array(os.path.join(parts, f"{prefix}features.npy"), (n, D))
    per_channel = None
    if is_channel_model(model):
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
        with misc.autocast(device, args.amp):
            pooled, channels = encode(model, imgs, channel_ids, args.pool)
        features[row : row + len(imgs)] = pooled.cpu().numpy()
        if per_channel is not None:
            per_channel[row : row + len(imgs)] = channels.cpu().numpy()
        row += len(imgs)
        if step % 50 == 0 or row == n:
            print(f"[rank {rank}] {row}/{n} samples, {time.time() - start:.1f}s", force=True)
    features.flush()
    if per_channel is not None:
        per_channel.flush()


def knn_classify(train_features, train_labels, query_features, num_classes, k=20, t=0.07, chunk=CHUNK_ROWS):
    """Weighted k-NN on cosine similarity (as in DINO): vote weight exp(similarity / t) per neighbour.

    train_features (M, D) and query_features (Q, D): arrays (memory maps welcome; read in chunks);
    train_labels (M,) ints in [0, num_classes). Returns the class scores (Q, num_classes) as a float64 array.
    """
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    k = min(k, len(labels))
    scores = np.zeros((len(query_features), num_classes))
    for q0 in range(0, len(query_features), chunk):
        query = torch.nn.functional.normalize(torch.as_tensor(np.asarray(query_features[q0 : q0 + chunk])), dim=1)
        best_sim = torch.full((len(query), 0), -2.0)
        best_label = torch.zeros((len(query), 0), dtype=torch.long)
        for m0 in range(0, len(labels), chunk):
            memory = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_features[m0 : m0 + chunk])), dim=1)
            sim = torch.cat([best_sim, query @ memory.T], dim=1)
            label = torch.cat([best_label, labels[m0 : m0 + chunk].expand(len(query), -1)], dim=1)
            best_sim, index = sim.topk(min(k, sim.shape[1]), dim=1)
            best_label = torch.gather(label, 1, index)
        votes = torch.zeros(len(query), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, best_label, (best_sim.double() / t).exp())
        scores[q0 : q0 + len(query)] = votes.numpy()
    return scores


def knn_accuracy(features, labels, is_train, is_query, num_classes, k, t):
    """k-NN with the labelled train rows as memory and the labelled query rows as queries.

    Returns (top-1 %, top-5 %, query row indices (Q,), predicted classes (Q,)).
    """
    train_rows = np.flatnonzero(is_train & (labels >= 0))
    query_rows = np.flatnonzero(is_query & (labels >= 0))
    if len(train_rows) == 0 or len(query_rows) == 0:
        raise ValueError("k-NN needs labelled train and val samples")
    train_features = RowView(features, train_rows)
    scores = knn_classify(train_features, labels[train_rows], RowView(features, query_rows), num_classes, k, t)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    target = labels[query_rows][:, None]
    top1 = float((ranked[:, :1] == target).any(axis=1).mean() * 100)
    top5 = float((ranked[:, :5] == target).any(axis=1).mean() * 100)
    return top1, top5, query_rows, ranked[:, 0]


class RowView:
    """Rows `rows` of a (memory-mapped) array, sliced lazily: view[a:b] reads only those rows."""

    def __init__(self, array, rows):
        self.array, self.rows = array, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.array[self.rows[index]]


def group_means(features, paths, regex):
    """Mean feature per group named by `regex` on each path: (names (G,), means (G, D), counts (G,))."""
    pattern = re.compile(regex)
    keys = []
    for path in paths:
        match = pattern.search(path)
        if match is None:
            raise ValueError(f"--group_regex {regex!r} does not match {path}")
        keys.append(match.group(1) if pattern.groups else match.group(0))
    names, inverse = np.unique(np.asarray(keys), return_inverse=True)
    sums = np.zeros((len(names), features.shape[1]))
    for r0 in range(0, len(features), CHUNK_ROWS):
        np.add.at(sums, inverse[r0 : r0 + CHUNK_ROWS], np.asarray(features[r0 : r0 + CHUNK_ROWS], dtype=np.float64))
    counts = np.bincount(inverse, minlength=len(names))
    return names, (sums / counts[:, None]).astype(np.float32), counts


def write_npz(path, arrays):
    """np.savez through a temporary file and a rename; memory-mapped arrays are copied in chunks."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def main(args):
    split = args.split or ("trainval" if args.knn_k else "pretrain")
    if args.knn_k and split != "trainval":
        raise misc.RunError("--knn_k needs --split trainval (train split as memory, val split as queries)")
    misc.init_distributed_mode(args)
    device = torch.device(args.device)
    overrides = misc.parse_model_kwargs(args.model_kwargs)
    model, info = model_from_checkpoint(
        args.resume, model=args.model, input_size=args.input_size, unsafe=args.unsafe_load, **overrides
    )
    if info["kind"] == "pretrain" and is_channel_model(model):
        model.mask_mode = "independent"  # mask ratio 0 keeps every token only in this mode
    model.to(device)
    inherit_data_args(args, info["args"], model)
    datasets = [eval_dataset(args, s) for s in (("train", "val") if split == "trainval" else (split,))]
    for d in datasets:
        d.skip_bad_samples = False  # each row must be the features of its path
    dataset = torch.utils.data.ConcatDataset(datasets)
    channel_ids = torch.as_tensor(datasets[0].channel_ids, device=device)
    print(f"{info['name']} ({info['kind']}, {args.resume}): {len(dataset)} samples, channels {channel_ids.tolist()}")

    parts = args.out + ".parts"
    if misc.is_main_process():
        shutil.rmtree(parts, ignore_errors=True)
        os.makedirs(parts)
    if misc.is_dist_avail_and_initialized():
        dist.barrier()
    extract(model, dataset, channel_ids, args, device, parts)
    if misc.is_dist_avail_and_initialized():
        dist.barrier()
    if not misc.is_main_process():
        misc.cleanup_distributed()
        return None

    N, D, C, W = len(dataset), model.cls_token.shape[-1], len(channel_ids), misc.get_world_size()
    names = ["features", "channel_features"] if is_channel_model(model) else ["features"]
    shapes = {"features": (N, D), "channel_features": (N, C, D)}
    if W > 1:
        arrays = {name: merge_shards(parts, name, shapes[name], W) for name in names}
    else:
        arrays = {name: np.load(os.path.join(parts, f"{name}.npy"), mmap_mode="r") for name in names}
    samples = [s for d in datasets for s in d.samples]
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    paths = np.asarray([sample_path(files) for files, _ in samples])
    split_names = np.repeat(["train", "val"] if split == "trainval" else [split], [len(d) for d in datasets])
    channel_names = datasets[0].channel_names or []
    arrays.update(
        labels=labels,
        paths=paths,
        split=split_names,
        classes=np.asarray(datasets[0].classes, dtype=str),
        channel_ids=np.asarray(datasets[0].channel_ids, dtype=np.int64),
        channel_names=np.asarray([channel_names[c] for c in datasets[0].channel_ids] if channel_names else [], str),
        model=np.asarray(info["name"]),
        pool=np.asarray(args.pool),
        checkpoint=np.asarray(os.path.abspath(args.resume)),
    )
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
    print(f"wrote {args.out}: features {N}x{D}" + (f", channel_features {N}x{C}x{D}" if C and len(names) > 1 else ""))
    misc.cleanup_distributed()
    return args.out


if __name__ == "__main__":
    misc.run_main(main, get_args_parser().parse_args(), errors=(DatasetError,))
