"""Quality of the cross-attention decoder against MAE's full decoder at equal epochs (issue 9).

For each decoder configuration (``full``, ``cross:R`` for a decode ratio R, and ``random``: a freshly initialised
model, no training) and each seed, with the same model size, epochs and seed everywhere:

1. IHC reconstruction. A tiny ChannelMAE is pretrained through ``main_pretrain.py`` (a subprocess) on a train
   split of ``sample_data/ihc``; the masked-reconstruction MSE is then measured on the held-out tiles with every
   masked token decoded (decode ratio 1, also for ``cross``), in the space the loss uses (normalised pixels, or
   per-patch normalised ones under ``--norm_pix_loss``), averaged over ``--mask_draws`` fixed masks that are the
   same for every configuration and seed.
2. Digits encoder quality. The same recipe pretrains on ``sample_data/digits/train`` (1 channel, 32 px); the
   encoder is then scored by weighted k-NN (cosine, k = 20, T = 0.07, ``util.features``; train
   split as memory, val split as queries) and by a linear probe through ``main_linprobe.py --finetune``. The
   masked-reconstruction MSE on the val digits is reported too.

The IHC split is spatial: tiles are named ``tile_yYYY_xXXX`` after their top-left pixel in one 512 x 512 slide
and overlap their neighbours, so the last ``--holdout_rows`` rows of tiles are held out and every training tile
that overlaps a held-out one is dropped (a guard band), written as two CSV indexes under ``--out_dir``.

Each MSE comes with the MSE of predicting 0 (the training mean) on the same masks as a reference.

    python benchmarks/bench_quality.py --out_dir /tmp/quality --json /tmp/quality/quality.json
    python benchmarks/bench_quality.py --seeds 1 --out_dir /tmp/q1 --json /tmp/q1.json   # another seed, in parallel
    python benchmarks/bench_quality.py --merge /tmp/quality/quality.json /tmp/q1.json     # tables of both

prints a Markdown table per run and, with several seeds, the mean and range; the defaults take about 15 minutes
per seed on 2 CPU cores. ``--tasks ihc`` or ``--tasks digits`` runs one half. Wall-clock seconds per
configuration are recorded, never asserted; on a shared machine they are noisy.
"""

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import main_pretrain  # noqa: E402
from models_checkpoint import build_pretrain_model, model_from_checkpoint  # noqa: E402
from util.checkpoint import args_to_dict  # noqa: E402
from util.data.builders import build_pretrain_dataset  # noqa: E402
from util.data.evaluation import eval_dataset, inherit_data_args  # noqa: E402
from util.data.readers import read_image  # noqa: E402
from util.features import encode, knn_accuracy  # noqa: E402
from util.flags import ArgumentParser  # noqa: E402
from util.rng import seed_everything  # noqa: E402
from util.vis import target_space_error, token_to_pixel_mask  # noqa: E402

IHC_DIR = ROOT / "sample_data" / "ihc"
DIGITS_DIR = ROOT / "sample_data" / "digits"
TILE_NAME = re.compile(r"tile_y(\d+)_x(\d+)\.tiff?$")
DEFAULT_CONFIGS = ["random", "full", "cross:1", "cross:0.5", "cross:0.25"]
MASK_SEED_BASE = 10_000
"""Mask draw d of the batch starting at sample b uses torch seed MASK_SEED_BASE + 1000 d + b: the same masks for
every configuration and training seed."""
METRICS = ("ihc_mse", "ihc_mse_excl", "digits_mse", "knn_top1", "probe_top1")
METRIC_HEADERS = ("IHC held-out MSE", "IHC MSE w/o {}", "digits val MSE", "k-NN top-1 %", "lin. probe top-1 %")


def get_args_parser():
    parser = ArgumentParser("Reconstruction and encoder quality: full vs cross decoder", description=__doc__)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="random | full | cross:R, 0 < R <= 1")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one full run per seed")
    parser.add_argument("--out_dir", default="quality_out", help="CSV indexes, checkpoints, logs")
    parser.add_argument("--json", default=None, help="write every result here")
    parser.add_argument(
        "--tasks", nargs="+", default=["ihc", "digits"], choices=["ihc", "digits"], help="what to pretrain and measure"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_workers", default=0, type=int, help="DataLoader workers of the training runs")
    parser.add_argument(
        "--threads", default=1, type=int, help="torch / OpenMP threads, here and in the training runs (0 = default)"
    )
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="JSON", help="only print the tables of earlier --json files"
    )

    g = parser.add_argument_group("model (shared by every configuration)")
    g.add_argument("--model", default="chamae_vit_tiny_patch16")
    g.add_argument("--embed_dim", default=96, type=int)
    g.add_argument("--depth", default=4, type=int)
    g.add_argument("--num_heads", default=3, type=int)
    g.add_argument("--decoder_embed_dim", default=64, type=int)
    g.add_argument("--decoder_depth", default=2, type=int)
    g.add_argument("--decoder_num_heads", default=2, type=int)
    g.add_argument("--mask_ratio", default=0.75, type=float)
    g.add_argument("--norm_pix_loss", action="store_true")

    g = parser.add_argument_group("IHC pretraining and reconstruction")
    g.add_argument("--ihc_dir", default=str(IHC_DIR))
    g.add_argument("--ihc_input_size", default=64, type=int)
    g.add_argument("--ihc_patch_size", default=8, type=int)
    g.add_argument("--holdout_rows", default=2, type=int, help="bottom rows of tiles held out")
    g.add_argument("--epochs", default=60, type=int, help="IHC pretraining epochs")
    g.add_argument("--ihc_warmup_epochs", default=6, type=int)
    g.add_argument("--ihc_batch_size", default=16, type=int)
    g.add_argument("--mask_draws", default=8, type=int, help="fixed masks averaged in the reconstruction MSE")
    g.add_argument(
        "--exclude_channels",
        nargs="*",
        default=["E"],
        help="also report the mean MSE of the other channels (E: a few huge outlier pixels, else constant)",
    )

    g = parser.add_argument_group("digits pretraining, k-NN and linear probe")
    g.add_argument("--digits_dir", default=str(DIGITS_DIR))
    g.add_argument("--digits_input_size", default=32, type=int)
    g.add_argument("--digits_patch_size", default=4, type=int)
    g.add_argument("--digits_epochs", default=10, type=int)
    g.add_argument("--digits_warmup_epochs", default=1, type=int)
    g.add_argument("--digits_batch_size", default=64, type=int)
    g.add_argument("--knn_k", default=20, type=int)
    g.add_argument("--knn_t", default=0.07, type=float)
    g.add_argument("--pool", default="mean", choices=["mean", "cls"], help="k-NN features and linear-probe input")
    g.add_argument("--probe_epochs", default=10, type=int)
    g.add_argument(
        "--probe_blr",
        default=25.0,
        type=float,
        help="main_linprobe --blr; LARS (trust coefficient 1e-3) needs an absolute lr near MAE's 6.4",
    )
    g.add_argument("--probe_batch_size", default=64, type=int)

    g = parser.add_argument_group("optimiser (both pretrainings)")
    g.add_argument("--lr", default=1e-3, type=float, help="absolute AdamW lr of main_pretrain")
    g.add_argument("--weight_decay", default=0.05, type=float)
    return parser


def parse_config(text):
    """'random' | 'full' | 'cross:R' -> dict(name, decoder, decode_ratio, trained)."""
    if text in ("random", "full"):
        return dict(name=text, decoder="full", decode_ratio=1.0, trained=text == "full")
    kind, _, ratio = text.partition(":")
    if kind != "cross":
        raise ValueError(f"unknown config '{text}': expected random, full or cross:R")
    r = float(ratio or 1.0)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"decode ratio of '{text}' must be in (0, 1]")
    return dict(name=f"cross:{r:g}", decoder="cross", decode_ratio=r, trained=True)


# ---------------------------------------------------------------------------------------------- data split


def ihc_split(ihc_dir, holdout_rows):
    """(train paths, held-out paths, tile size): the last `holdout_rows` tile rows, minus a guard band.

    A training tile is dropped when its rows overlap those of any held-out tile, so no held-out pixel is seen
    in training.
    """
    tiles = []
    for path in sorted(Path(ihc_dir).iterdir()):
        match = TILE_NAME.search(path.name)
        if match:
            tiles.append((int(match.group(1)), int(match.group(2)), path.resolve()))
    if not tiles:
        raise SystemExit(f"no tile_yYYY_xXXX.tif files in {ihc_dir}")
    size = read_image(tiles[0][2]).shape[-2]
    rows = sorted({y for y, _, _ in tiles})
    if not 0 < holdout_rows < len(rows):
        raise SystemExit(f"--holdout_rows must be between 1 and {len(rows) - 1}")
    first_held = rows[-holdout_rows]
    held = [p for y, _, p in tiles if y >= first_held]
    train = [p for y, _, p in tiles if y + size <= first_held]
    return train, held, size


def write_index(path, files):
    """A pretraining CSV index 'path,label' with absolute paths and empty labels."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([str(p), ""] for p in files)
    return path


# ---------------------------------------------------------------------------------------------- training


def model_kwargs(args, decoder=True):
    keys = ["embed_dim", "depth", "num_heads"]
    if decoder:
        keys += ["decoder_embed_dim", "decoder_depth", "decoder_num_heads"]
    return [f"{k}={getattr(args, k)}" for k in keys]


def pretrain_argv(args, cfg, seed, dataset, output_dir):
    """main_pretrain.py arguments for one configuration; dataset: the IHC train CSV, or the string 'digits'."""
    ihc = dataset != "digits"
    argv = ["--model", args.model, "--model_kwargs", *model_kwargs(args)]
    argv += ["--decoder", cfg["decoder"], "--decode_ratio", str(cfg["decode_ratio"])]
    argv += ["--mask_ratio", str(args.mask_ratio), "--lr", str(args.lr), "--weight_decay", str(args.weight_decay)]
    argv += ["--norm_pix_loss"] if args.norm_pix_loss else []
    if ihc:
        argv += ["--data_path", str(dataset), "--channel_stats", str(Path(args.ihc_dir) / "channel_stats.json")]
        argv += ["--input_size", str(args.ihc_input_size), "--patch_size", str(args.ihc_patch_size)]
        argv += ["--epochs", str(args.epochs), "--warmup_epochs", str(args.ihc_warmup_epochs)]
        argv += ["--batch_size", str(args.ihc_batch_size)]
    else:
        argv += ["--data_path", str(args.digits_dir)]
        argv += ["--input_size", str(args.digits_input_size), "--patch_size", str(args.digits_patch_size)]
        argv += ["--epochs", str(args.digits_epochs), "--warmup_epochs", str(args.digits_warmup_epochs)]
        argv += ["--batch_size", str(args.digits_batch_size)]
    argv += ["--seed", str(seed), "--device", args.device, "--num_workers", str(args.num_workers)]
    return argv + ["--output_dir", str(output_dir), "--print_freq", "1000"]


def run_cli(script, argv, log_path, threads=0):
    """Run `python script argv` from the repository root, output to log_path; returns the wall seconds.

    threads > 0 sets OMP_NUM_THREADS (torch's intra-op threads) of the child.
    """
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    with open(log_path, "w") as log:
        cmd = [sys.executable, str(ROOT / script), *argv]
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{script} exited with code {proc.returncode} (log {log_path}):\n{tail}")
    return seconds


def fresh_dir(path):
    """Create ``path`` empty: a rerun measures from scratch (the training CLIs refuse a folder holding a run)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def last_log_line(output_dir):
    """The last JSON line of output_dir/log.txt (main_* write one per epoch)."""
    lines = (Path(output_dir) / "log.txt").read_text().splitlines()
    return json.loads(lines[-1])


def pretrain(args, cfg, seed, dataset, output_dir):
    """Pretrain through main_pretrain.py, or write the initial weights for 'random'.

    Returns (checkpoint path, wall seconds, last epoch's train loss or None).
    """
    fresh_dir(output_dir)
    argv = pretrain_argv(args, cfg, seed, dataset, output_dir)
    if not cfg["trained"]:
        return write_initial_checkpoint(argv, output_dir / "checkpoint-init.pth"), 0.0, None
    seconds = run_cli("main_pretrain.py", argv, output_dir / "pretrain.log", args.threads)
    return output_dir / "checkpoint-last.pth", seconds, last_log_line(output_dir)["train_loss"]


def write_initial_checkpoint(argv, path):
    """The model main_pretrain.py would build from argv, seeded with its --seed, saved untrained."""
    args = main_pretrain.get_args_parser().parse_args(argv)
    seed_everything(args.seed)
    dataset = build_pretrain_dataset(args)
    model = build_pretrain_model(args, dataset.in_chans, dataset.num_channels)
    torch.save(dict(model=model.state_dict(), args=args_to_dict(args), epoch=-1), path)
    return path


# ---------------------------------------------------------------------------------------------- evaluation


def load_pretrain_model(ckpt, device):
    model, info = model_from_checkpoint(str(ckpt))
    return model.to(device).eval(), info


def data_args(info, model, **flags):
    """A namespace of data flags, unset ones inherited from the checkpoint's training args."""
    fields = dict(data_path=None, channels=None, mean=None, std=None, channel_stats=None)
    args = argparse.Namespace(**{**fields, **flags})
    return inherit_data_args(args, info["args"], model)


def stack(dataset):
    """All items of a small dataset: (imgs (N, C, H, W), labels (N,))."""
    imgs, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(imgs), torch.as_tensor(labels)


@torch.no_grad()
def masked_mse(model, imgs, channel_ids, mask_ratio, draws, batch_size=128):
    """Reconstruction MSE over the masked tokens, every masked token decoded; mean over `draws` fixed masks.

    imgs: (N, C, H, W) normalised. The error is in the model's target space (util.vis.target_space_error: the
    loss's squared errors, each at its pixel), so 'mse' is the loss over the masked tokens. Returns a dict: 'mse'
    (float), 'channel_mse' (C floats: over each channel's masked pixels; an MAE token holds every channel, so
    its channels are told apart by pixel, not by token) and 'zero_mse', 'zero_channel_mse': the same for a
    prediction of 0 everywhere (the training mean, for unnormalised targets) on the same masks, a reference.
    """
    N, C = imgs.shape[:2]
    sums = torch.zeros(2, C, dtype=torch.float64)  # model, zero prediction
    counts = torch.zeros(C, dtype=torch.float64)
    for draw in range(draws):
        for b0 in range(0, N, batch_size):
            batch = imgs[b0 : b0 + batch_size]
            torch.manual_seed(MASK_SEED_BASE + draw * 1000 + b0)
            latent, mask, ids_restore = model.forward_encoder(batch, mask_ratio, channel_ids)
            pred, _ = model.forward_decoder(latent, ids_restore, channel_ids, 1.0)
            masked = token_to_pixel_mask(model, mask, C)
            for k, p in enumerate((pred, torch.zeros_like(pred))):
                sums[k] += (target_space_error(model, batch, p) * masked).double().sum(dim=(0, 2, 3)).cpu()
            counts += masked.sum(dim=(0, 2, 3)).double().cpu()
    per_channel = torch.where(counts > 0, sums / counts.clamp(min=1), math.nan).tolist()
    total = (sums.sum(dim=1) / counts.sum()).tolist()
    return dict(mse=total[0], channel_mse=per_channel[0], zero_mse=total[1], zero_channel_mse=per_channel[1])


def evaluate_ihc(args, ckpt, heldout_csv):
    """Held-out masked-reconstruction MSE of an IHC checkpoint on the full tiles (no resampling)."""
    device = torch.device(args.device)
    model, info = load_pretrain_model(ckpt, device)
    data = data_args(info, model)
    data.data_path = str(heldout_csv)
    names_file = Path(args.ihc_dir) / "channels.txt"
    if names_file.is_file():
        data.channel_names = names_file.read_text().split()
    dataset = build_pretrain_dataset(data)
    dataset.transform = v2.Normalize(dataset.mean, dataset.std)
    imgs, _ = stack(dataset)
    channel_ids = torch.as_tensor(dataset.channel_ids, device=device)
    errors = masked_mse(model, imgs.to(device), channel_ids, args.mask_ratio, args.mask_draws)
    names = dataset.read_names
    return dict(
        ihc_mse=errors["mse"],
        ihc_channel_mse=dict(zip(names, errors["channel_mse"])),
        ihc_zero_mse=errors["zero_mse"],
        ihc_zero_channel_mse=dict(zip(names, errors["zero_channel_mse"])),
        ihc_heldout_tiles=len(dataset),
    )


def evaluate_digits(args, ckpt):
    """k-NN accuracy (train memory, val queries) and val masked-reconstruction MSE of a digits checkpoint."""
    device = torch.device(args.device)
    model, info = load_pretrain_model(ckpt, device)
    data = data_args(info, model, data_path=str(args.digits_dir))
    train, val = eval_dataset(data, "train"), eval_dataset(data, "val")
    channel_ids = torch.as_tensor(train.channel_ids, device=device)
    features, labels = [], []
    for dataset in (train, val):
        imgs, y = stack(dataset)
        with torch.no_grad():
            for b0 in range(0, len(imgs), 256):
                features.append(encode(model, imgs[b0 : b0 + 256].to(device), channel_ids, args.pool)[0].cpu())
        labels.append(y)
    features, labels = torch.cat(features).numpy(), torch.cat(labels).numpy()
    is_train = np.arange(len(labels)) < len(train)
    top1, top5, _, _ = knn_accuracy(features, labels, is_train, ~is_train, len(train.classes), args.knn_k, args.knn_t)
    val_imgs = stack(val)[0].to(device)
    errors = masked_mse(model, val_imgs, channel_ids, args.mask_ratio, args.mask_draws)
    return dict(knn_top1=top1, knn_top5=top5, digits_mse=errors["mse"], digits_zero_mse=errors["zero_mse"])


def linear_probe(args, ckpt, seed, output_dir):
    """main_linprobe.py --finetune ckpt; returns (last epoch's val top-1, wall seconds)."""
    argv = ["--finetune", str(ckpt), "--model", classifier_model(args.model)]
    argv += ["--model_kwargs", *model_kwargs(args, decoder=False)]
    argv += ["--global_pool"] if args.pool == "mean" else ["--cls_token"]
    argv += ["--data_path", str(args.digits_dir), "--input_size", str(args.digits_input_size)]
    argv += ["--epochs", str(args.probe_epochs), "--warmup_epochs", str(min(1, args.probe_epochs - 1))]
    argv += ["--blr", str(args.probe_blr), "--batch_size", str(args.probe_batch_size)]
    argv += ["--seed", str(seed), "--device", args.device, "--num_workers", str(args.num_workers)]
    argv += ["--output_dir", str(output_dir), "--print_freq", "1000"]
    fresh_dir(output_dir)
    seconds = run_cli("main_linprobe.py", argv, output_dir / "linprobe.log", args.threads)
    return last_log_line(output_dir)["test_acc1"], seconds


def classifier_model(name):
    """chamae_vit_* / channelmae_vit_* -> channelvit_*, mae_vit_* -> vit_*."""
    name = name.replace("channelmae_", "chamae_")
    return "channel" + name[len("chamae_") :] if name.startswith("chamae_") else name.removeprefix("mae_")


IHC_KEYS = ("ihc_mse", "ihc_channel_mse", "ihc_zero_mse", "ihc_zero_channel_mse", "ihc_heldout_tiles")
DIGITS_KEYS = ("knn_top1", "knn_top5", "digits_mse", "digits_zero_mse", "probe_top1")


def run_one(args, cfg, seed, train_csv, heldout_csv):
    """All measurements of one configuration and seed; those of a task not in args.tasks are None."""
    run_dir = Path(args.out_dir) / f"seed{seed}" / cfg["name"].replace(":", "")
    start = time.perf_counter()
    result = dict(config=cfg["name"], decoder=cfg["decoder"], decode_ratio=cfg["decode_ratio"], seed=seed)
    result.update(dict.fromkeys((*IHC_KEYS, *DIGITS_KEYS, "ihc_train_loss", "digits_train_loss")))
    result.update(ihc_pretrain_s=0.0, digits_pretrain_s=0.0, probe_s=0.0)
    if "ihc" in args.tasks:
        ihc_ckpt, result["ihc_pretrain_s"], result["ihc_train_loss"] = pretrain(
            args, cfg, seed, train_csv, run_dir / "ihc"
        )
        result.update(evaluate_ihc(args, ihc_ckpt, heldout_csv))
    if "digits" in args.tasks:
        digits_ckpt, result["digits_pretrain_s"], result["digits_train_loss"] = pretrain(
            args, cfg, seed, "digits", run_dir / "digits"
        )
        result.update(evaluate_digits(args, digits_ckpt))
        result["probe_top1"], result["probe_s"] = linear_probe(args, digits_ckpt, seed, run_dir / "linprobe")
    result.update(total_s=time.perf_counter() - start, load_avg=os.getloadavg()[0])
    return result


# ---------------------------------------------------------------------------------------------- report


def fmt(value, digits=3):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def metric_headers(excluded):
    return [h.format(",".join(excluded) or "-") for h in METRIC_HEADERS]


def results_table(results, excluded):
    header = ["config", "seed", *metric_headers(excluded), "IHC train loss"]
    header += ["digits train loss", "pretrain s (IHC + digits)", "total s"]
    rows = [
        [
            r["config"],
            str(r["seed"]),
            fmt(r["ihc_mse"]),
            fmt(r["ihc_mse_excl"]),
            fmt(r["digits_mse"]),
            fmt(r["knn_top1"], 1),
            fmt(r["probe_top1"], 1),
            fmt(r["ihc_train_loss"]),
            fmt(r["digits_train_loss"]),
            f"{r['ihc_pretrain_s']:.0f} + {r['digits_pretrain_s']:.0f}",
            f"{r['total_s']:.0f}",
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def add_excluded_mean(result, excluded):
    """result['ihc_mse_excl']: the mean of the per-channel held-out MSEs of the channels not in `excluded`."""
    if result.get("ihc_channel_mse") is None:
        result["ihc_mse_excl"] = None
        return result
    kept = [v for name, v in result["ihc_channel_mse"].items() if name not in excluded]
    result["ihc_mse_excl"] = float(np.mean(kept)) if kept else math.nan
    return result


def channel_table(results):
    names = list(results[0]["ihc_channel_mse"])
    rows = [[r["config"], str(r["seed"])] + [fmt(r["ihc_channel_mse"][n]) for n in names] for r in results]
    if "ihc_zero_channel_mse" in results[0]:
        rows.append(["predict 0", "-"] + [fmt(results[0]["ihc_zero_channel_mse"][n]) for n in names])
    return markdown_table(["config", "seed", *names], rows)


def summarize(results):
    """Per configuration over seeds: mean, min and max of each metric."""
    summary = []
    for name in dict.fromkeys(r["config"] for r in results):
        rows = [r for r in results if r["config"] == name]
        entry = dict(config=name, seeds=[r["seed"] for r in rows])
        for key in (*METRICS, "total_s"):
            values = [r[key] for r in rows if r.get(key) is not None]
            stats = (float(np.mean(values)), float(min(values)), float(max(values))) if values else (None,) * 3
            entry[key] = dict(zip(("mean", "min", "max"), stats))
        summary.append(entry)
    return summary


def summary_table(summary, excluded):
    def cell(stats, digits):
        if stats["mean"] is None:
            return "-"
        return f"{stats['mean']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"

    header = ["config", "seeds", *metric_headers(excluded)]
    rows = [
        [s["config"], ",".join(map(str, s["seeds"]))] + [cell(s[k], d) for k, d in zip(METRICS, (3, 3, 3, 1, 1))]
        for s in summary
    ]
    return markdown_table(
        header + ["total s"], [row + [f"{s['total_s']['mean']:.0f}"] for row, s in zip(rows, summary)]
    )


def progress_line(result):
    parts = [("IHC MSE", "ihc_mse", 4, ""), ("k-NN", "knn_top1", 1, "%"), ("probe", "probe_top1", 1, "%")]
    done = [f"{label} {result[key]:.{digits}f}{unit}" for label, key, digits, unit in parts if result[key] is not None]
    return ", ".join([*done, f"{result['total_s']:.0f} s"])


def settings_line(settings):
    s = settings
    return (
        f"# {s['model']} embed {s['embed_dim']} x {s['depth']} ({s['num_heads']} heads), decoder "
        f"{s['decoder_embed_dim']} x {s['decoder_depth']} ({s['decoder_num_heads']} heads), mask ratio "
        f"{s['mask_ratio']}; IHC {s['ihc_input_size']} px patch {s['ihc_patch_size']}, {s['epochs']} epochs; digits "
        f"{s['digits_input_size']} px patch {s['digits_patch_size']}, {s['digits_epochs']} epochs; linear probe "
        f"{s['probe_epochs']} epochs; MSE over all masked tokens, mean of {s['mask_draws']} fixed masks"
    )


def print_report(settings, results):
    excluded = settings["exclude_channels"]
    print(settings_line(settings))
    print(results_table(results, excluded))
    with_ihc = [r for r in results if r.get("ihc_channel_mse") is not None]
    if with_ihc:
        print("\n# IHC held-out MSE per channel")
        print(channel_table(with_ihc))
    if len({r["seed"] for r in results}) > 1:
        print("\n# mean (min-max) over seeds")
        print(summary_table(summarize(results), excluded))


def merge(paths):
    """Print the tables of several --json reports (e.g. one per seed, run in parallel) as one."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    settings = reports[0]["settings"]
    settings.setdefault("exclude_channels", get_args_parser().get_default("exclude_channels"))
    results = [add_excluded_mean(r, settings["exclude_channels"]) for report in reports for r in report["results"]]
    print_report(settings, results)


def main(args):
    if args.merge:
        return merge(args.merge)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [parse_config(c) for c in args.configs]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held, size = ihc_split(args.ihc_dir, args.holdout_rows)
    train_csv = write_index(out_dir / "ihc_train.csv", train)
    heldout_csv = write_index(out_dir / "ihc_heldout.csv", held)
    print(
        f"# IHC: {len(train)} train tiles, {len(held)} held-out tiles (last {args.holdout_rows} rows of {size} px "
        f"tiles; overlapping training tiles dropped), indexes in {out_dir}",
        flush=True,
    )
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        device=args.device,
        command=" ".join(sys.argv),
    )
    split = dict(train_tiles=len(train), heldout_tiles=len(held), tile_size=size, holdout_rows=args.holdout_rows)
    results = []
    for seed in args.seeds:
        for cfg in configs:
            print(f"[seed {seed}] {cfg['name']} ...", file=sys.stderr, flush=True)
            r = add_excluded_mean(run_one(args, cfg, seed, train_csv, heldout_csv), args.exclude_channels)
            results.append(r)
            print(f"[seed {seed}] {cfg['name']}: {progress_line(r)}", file=sys.stderr, flush=True)
            if args.json:  # after every configuration, so that an interrupted run keeps what it measured
                report = dict(environment=env, settings=vars(args), ihc_split=split, results=results)
                report["summary"] = summarize(results)
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report, indent=1))
    print_report(vars(args), results)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
