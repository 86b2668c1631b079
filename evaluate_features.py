"""Evaluate frozen embeddings (an ``extract_features.py`` .npz) with the protocols the field uses.

    python evaluate_features.py F.npz --protocol knn --out knn.json
    python evaluate_features.py F.npz --protocol chammi --tasks tasks.json --out chammi.json
    python evaluate_features.py F.npz --protocol profile --well_column well --plate_column plate \\
        --treatment_column compound --control DMSO --out profile.json
    python evaluate_features.py F.npz --protocol channels --plot robustness.png --out channels.json

knn: train split as memory, val split as queries; 1-NN (cosine) macro-F1 and top-1, weighted 20-NN top-1/5.
chammi: CHAMMI-style tasks from a JSON file (util/protocols/nearest.py), 1-NN cosine, macro-F1, domains held
out by a metadata column; the CHAMMI score when the tasks carry CHAMMI's names. profile: well profiles,
per-plate normalisation against control wells, phenotypic-activity and replicate-retrieval mAP (copairs).
channels: re-encodes the data (the .npz's checkpoint and data flags, or --resume / --data_path) on subsets of
the channels and reports 1-NN top-1 and macro-F1 (and a classifier checkpoint's own top-1) against the number
of channels k; whole-patch models get the missing channels zero-filled. Metadata columns are the .npz's
``metadata_<name>`` arrays plus ``split`` and ``label``. Writes JSON {"protocol", "features", "results": {task:
{metric: value}}, ...} and prints a Markdown table; --scatter draws a PCA scatter coloured by --colour_by.
"""

import json
import os

import numpy as np
import torch

from engine_features import bag_of_channels, encode_subset, head_of, load_encoder_and_data, raw_pixels, vocabulary_size
from util.cli import add_reading_args, run_main
from util.data.errors import DatasetError
from util.distributed import default_device
from util.errors import RunError
from util.flags import ArgumentParser
from util.protocols.featureset import load_features
from util.protocols.nearest import chammi_protocol, knn_protocol, one_nn_predict, read_tasks, scores
from util.protocols.profiling import NORMALISATIONS, profile_protocol
from util.protocols.report import markdown_table, pca_scatter
from util.protocols.robustness import channel_subsets, curve, plot_curves

PROTOCOLS = ("knn", "chammi", "profile", "channels")


def get_args_parser():
    parser = ArgumentParser("Frozen-feature evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("features", help="an extract_features.py .npz")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--key", default="features", help="the .npz array to evaluate")
    parser.add_argument("--seed", default=0, type=int, help="subset draws, mAP null distributions")
    parser.add_argument("--scatter", default=None, help="also draw a PCA scatter of the embeddings to this PNG")
    parser.add_argument("--colour_by", default="label", help="metadata columns colouring the scatter, e.g. label,plate")
    g = parser.add_argument_group("knn")
    g.add_argument("--knn_k", default=20, type=int)
    g.add_argument("--knn_t", default=0.07, type=float)
    g = parser.add_argument_group("chammi")
    g.add_argument("--tasks", default=None, help="JSON task file (see util/protocols/nearest.py)")
    g = parser.add_argument_group("profile")
    g.add_argument("--well_column", default="well")
    g.add_argument("--plate_column", default="plate")
    g.add_argument("--treatment_column", default="treatment")
    g.add_argument("--control", default=None, help="the control treatment (e.g. DMSO)")
    g.add_argument("--normalisation", default="center_scale", choices=NORMALISATIONS)
    g.add_argument("--aggregate", default="mean", choices=["mean", "median"])
    g.add_argument("--null_size", default=1000, type=int, help="mAP permutation null size")
    g = parser.add_argument_group("channels (re-encodes the data)")
    g.add_argument("--resume", default=None, help="checkpoint (default: the one the .npz was extracted from)")
    g.add_argument("--max_subsets", default=10, type=int, help="subsets per size k at most (random beyond)")
    g.add_argument("--plot", default=None, help="accuracy-against-k PNG")
    g.add_argument("--pool", default=None, choices=["mean", "cls"], help="default: the .npz's")
    g.add_argument("--batch_size", default=64, type=int)
    g.add_argument("--device", default=default_device())
    g.add_argument("--num_workers", default=0, type=int)
    g.add_argument("--unsafe_load", action="store_true")
    g.add_argument("--input_size", default=None, type=int)
    g.add_argument("--data_path", default=None)
    g.add_argument("--channels", default=None)
    g.add_argument("--mean", default=None, type=float, nargs="+")
    g.add_argument("--std", default=None, type=float, nargs="+")
    g.add_argument("--channel_stats", default=None)
    add_reading_args(g)
    return parser


def check_flags(args):
    """``RunError`` for flags a protocol needs, before anything is read."""
    if args.protocol == "chammi" and not args.tasks:
        raise RunError("--protocol chammi needs --tasks TASKS.json")
    if args.protocol == "profile" and args.control is None:
        raise RunError("--protocol profile needs --control (the control treatment, e.g. DMSO)")
    if args.max_subsets < 1:
        raise RunError(f"--max_subsets {args.max_subsets} must be >= 1")
    for flag, path in (("--out", args.out), ("--plot", args.plot), ("--scatter", args.scatter)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise RunError(f"{flag} {path}: directory {folder} does not exist")


def npz_value(path, key, default=None):
    with np.load(path, allow_pickle=False) as data:
        return data[key].item() if key in data.files else default


@torch.no_grad()
def subset_features(model, loader, channel_ids, subsets, kind, vocabulary, pool, head, device):
    """One pass over the data: for every subset, the embeddings (N, F) and, with a head, predictions (N,).

    vocabulary: the bag-of-channels slots, or the pixel size S of raw-pixel features."""
    features = [[] for _ in subsets]
    preds = [[] for _ in subsets]
    for imgs, _ in loader:
        imgs = imgs.to(device)
        for s, keep in enumerate(subsets):
            if kind == "raw_pixels":
                x = raw_pixels(imgs, vocabulary, keep)
            elif kind == "bag_of_channels":
                x = bag_of_channels(model, imgs, channel_ids, vocabulary, pool, keep)
            else:
                x = encode_subset(model, imgs, channel_ids, keep, pool)
            features[s].append(x.cpu().numpy())
            if head is not None:
                preds[s].append((x.cpu() @ head[0].T + head[1]).argmax(1).numpy())
    return [np.concatenate(f) for f in features], [np.concatenate(p) if p else None for p in preds]


def channels_protocol(args, fs):
    """Accuracy against the number of channels (see the module docstring)."""
    args.resume = args.resume or fs.checkpoint
    if not args.resume:
        raise RunError(f"{fs.path} records no checkpoint: pass --resume")
    kind = npz_value(fs.path, "feature_kind", "encoder")
    args.pool = args.pool or npz_value(fs.path, "pool", "mean")
    model, info, datasets = load_encoder_and_data(args)
    head = head_of(args.resume, args.unsafe_load) if info["kind"] == "classifier" else None
    if head is not None:
        args.pool = "mean" if model.global_pool == "avg" else "cls"
    channel_ids = torch.as_tensor(datasets[0].channel_ids, device=args.device)
    names = [str(n) for n in fs.channel_names] or [f"ch{c}" for c in datasets[0].channel_ids]
    vocabulary = vocabulary_size(model, datasets[0])
    if kind == "raw_pixels":
        vocabulary = round(np.sqrt(fs.features.shape[1] // len(channel_ids)))  # the pixel size S
    subsets = channel_subsets(len(channel_ids), args.max_subsets, args.seed)
    data = torch.utils.data.ConcatDataset(datasets)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers)
    labels = np.asarray([label for d in datasets for _, label in d.samples])
    is_train = np.repeat([True, False], [len(d) for d in datasets])
    print(f"{info['name']}: {len(subsets)} channel subsets of {names}, {kind} features, {len(data)} samples")
    feats, preds = subset_features(model, loader, channel_ids, subsets, kind, vocabulary, args.pool, head, args.device)
    rows = []
    for keep, x, pred in zip(subsets, feats, preds):
        knn = scores(labels[~is_train], one_nn_predict(x[is_train], labels[is_train], x[~is_train]))
        row = {"channels": [names[c] for c in keep], "knn_top1": knn["top1"], "knn_macro_f1": knn["macro_f1"]}
        if pred is not None:
            row["classifier_top1"] = float((pred[~is_train] == labels[~is_train]).mean() * 100)
        rows.append(row)
    metrics = ["knn_top1", "knn_macro_f1"] + (["classifier_top1"] if head is not None else [])
    curves = {m: curve(rows, m) for m in metrics}
    results = {
        f"k={k}": {"top1": curves["knn_top1"][k]["mean"], "macro_f1": curves["knn_macro_f1"][k]["mean"]}
        | ({"classifier_top1": curves["classifier_top1"][k]["mean"]} if head is not None else {})
        | {"top1_min": curves["knn_top1"][k]["min"], "top1_max": curves["knn_top1"][k]["max"]}
        | {"n_subsets": curves["knn_top1"][k]["n_subsets"]}
        for k in curves["knn_top1"]
    }
    if args.plot:
        lines = {"1-NN": curves["knn_top1"]} | ({"classifier": curves["classifier_top1"]} if head is not None else {})
        plot_curves(lines, args.plot, "top-1 (%)", f"{info['name']} ({kind})")
    return results, {"per_subset": rows, "curves": curves, "checkpoint": os.path.abspath(args.resume), "kind": kind}


def main(args):
    check_flags(args)
    config = read_tasks(args.tasks) if args.protocol == "chammi" else None
    fs = load_features(args.features, args.key)
    extra = {}
    if args.protocol == "knn":
        results = knn_protocol(fs, args.knn_k, args.knn_t)
    elif args.protocol == "chammi":
        results = chammi_protocol(fs, config)
        extra["tasks_file"] = config["file"]
    elif args.protocol == "profile":
        results = profile_protocol(
            fs,
            well=args.well_column,
            plate=args.plate_column,
            treatment=args.treatment_column,
            control=args.control,
            method=args.normalisation,
            aggregate=args.aggregate,
            null_size=args.null_size,
            seed=args.seed,
        )
    else:
        results, extra = channels_protocol(args, fs)
    if args.scatter:
        colourings = {c: fs.column(c) for c in args.colour_by.split(",") if c}
        pca_scatter(fs.features, colourings, args.scatter, os.path.basename(args.features))
    record = {"protocol": args.protocol, "features": os.path.abspath(args.features), "key": args.key}
    with open(args.out, "w") as f:
        json.dump({**record, "results": results, **extra}, f, indent=1)
    print(markdown_table(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args(), errors=(DatasetError,))
