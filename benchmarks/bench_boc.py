"""MAE vs ChannelMAE (independent / spatial / channel masking) vs bag of channels, at equal optimizer steps (issue 16).

Stage ``pretrain``: every configuration and seed runs ``main_pretrain.py`` (a subprocess) with the same encoder,
decoder, batch size and epochs, hence the same number of optimizer steps, on the train split of the labelled
IHC crops (``benchmarks/build_ihc_labelled.py``). ``random_*`` configurations are the same architectures as
built by ``main_pretrain.py``, saved untrained under ``torch.manual_seed(seed)`` (the random-init baseline).

Stage ``evaluate``: each checkpoint goes through ``extract_features.py`` (``--bag_of_channels`` for the BoC
encoder, plate and well read from the file names) and ``evaluate_features.py`` with the CHAMMI-style tasks, the
k-NN, profiling and channel-robustness protocols; raw pixels (resized to 16 px, flattened) are scored the same
way. ``--stage report`` prints the tables (mean and range over seeds) from the JSON files.

    python benchmarks/build_ihc_labelled.py --out /tmp/ihc_labelled
    python benchmarks/bench_boc.py --stage pretrain --data /tmp/ihc_labelled --out_dir /tmp/boc --seeds 0 1 2
    python benchmarks/bench_boc.py --stage evaluate --data /tmp/ihc_labelled --out_dir /tmp/boc --seeds 0 1 2
    python benchmarks/bench_boc.py --stage report --out_dir /tmp/boc
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT_DIR = Path(__file__).resolve().parents[1]
if str(ROOT_DIR) not in sys.path:
    sys.path.insert(0, str(ROOT_DIR))

import torch  # noqa: E402

import main_pretrain  # noqa: E402
from models_checkpoint import build_pretrain_model  # noqa: E402
from util.bag_of_channels import SingleChannelDataset  # noqa: E402
from util.checkpoint import args_to_dict  # noqa: E402
from util.data.builders import build_pretrain_dataset  # noqa: E402
from util.data.stats import normalization_record  # noqa: E402
from util.protocols.robustness import plot_curves  # noqa: E402

ROOT = ROOT_DIR
CONFIGS = {
    "mae": ["--model", "mae_vit_tiny_patch16"],
    "chamae_independent": ["--model", "chamae_vit_tiny_patch16", "--mask_mode", "independent"],
    "chamae_spatial": ["--model", "chamae_vit_tiny_patch16", "--mask_mode", "spatial"],
    "chamae_channel": ["--model", "chamae_vit_tiny_patch16", "--mask_mode", "channel", "--mask_ratio", "0.5"],
    "boc": ["--model", "mae_vit_tiny_patch16", "--bag_of_channels"],
    "random_mae": ["--model", "mae_vit_tiny_patch16"],
    "random_chamae": ["--model", "chamae_vit_tiny_patch16"],
    "random_boc": ["--model", "mae_vit_tiny_patch16", "--bag_of_channels"],
}
BOC = ("boc", "random_boc")
TASKS = {
    "tasks": [
        {"name": "IHC_Task_one", "column": "split", "train": ["train"], "test": ["val"]},
        {"name": "IHC_Task_two", "column": "plate", "test": ["P3"]},
        {"name": "IHC_Task_three", "column": "plate", "leave_one_out": True},
    ]
}
PATH_METADATA = [r"plate=(P\d)_", r"well=/(\w+/P\d_w\d+)_"]
"""A "well" is the crops of one class in one 64 x 64 block of the slide, so that each well has one treatment."""
MODEL_KWARGS = ["embed_dim=64", "depth=2", "num_heads=2", "decoder_embed_dim=32", "decoder_depth=1"]
MODEL_KWARGS += ["decoder_num_heads=2"]
COLUMNS = [
    ("chammi", "IHC_Task_one", "macro_f1", "F1 same plates"),
    ("chammi", "IHC_Task_two", "macro_f1", "F1 P3 held out"),
    ("chammi", "IHC_Task_three", "macro_f1", "F1 leave-plate-out"),
    ("knn", "20nn_weighted", "top1", "20-NN top-1"),
    ("profile", "activity", "map", "activity mAP"),
    ("profile", "replicates", "map", "replicate mAP"),
]


def run(argv, log):
    with open(log, "w") as f:
        subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def pretrain_argv(args, name, seed, out):
    argv = ["--data_path", args.data, "--input_size", "32", "--patch_size", "8", *CONFIGS[name]]
    argv += ["--model_kwargs", *args.model_kwargs, "--batch_size", str(args.batch_size), "--epochs", str(args.epochs)]
    argv += ["--seed", str(seed), "--num_workers", "0", "--vis_every", "0", "--output_dir", str(out)]
    return argv + ["--warmup_epochs", "5", "--blr", str(args.blr)]


def random_init(args, name, seed, out):
    """checkpoint-0.pth of the model main_pretrain would build, as initialised under torch.manual_seed(seed)."""
    flags = main_pretrain.get_args_parser().parse_args(pretrain_argv(args, name, seed, out))
    dataset = build_pretrain_dataset(flags)
    flags.normalization = normalization_record(dataset)
    torch.manual_seed(seed)
    source = SingleChannelDataset(dataset) if flags.bag_of_channels else dataset
    model = build_pretrain_model(flags, source.in_chans, source.num_channels)
    state = {"model": model.state_dict(), "args": args_to_dict(flags), "epoch": 0}
    for tag in ("0", "last"):
        torch.save(state, out / f"checkpoint-{tag}.pth")


def pretrain(args, name, seed):
    out = Path(args.out_dir) / f"{name}_s{seed}"
    random = name.startswith("random_")
    if (out / f"checkpoint-{0 if random else args.epochs - 1}.pth").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    if random:
        random_init(args, name, seed, out)
    else:
        run(["main_pretrain.py", *pretrain_argv(args, name, seed, out)], out / "pretrain.log")


def evaluate(args, name, seed):
    out = Path(args.out_dir) / f"{name}_s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    source = f"random_mae_s{seed}" if name == "raw_pixels" else out.name
    ckpt = Path(args.out_dir) / source / "checkpoint-last.pth"
    extract = ["extract_features.py", "--resume", str(ckpt), "--data_path", args.data, "--split", "trainval"]
    extract += ["--num_workers", "0", "--path_metadata", *PATH_METADATA]
    extract += ["--bag_of_channels"] if name in BOC else []
    extract += ["--raw_pixels", "16"] if name == "raw_pixels" else []
    features = str(out / "features.npz")
    run([*extract, "--out", features], out / "extract.log")
    tasks = out / "tasks.json"
    tasks.write_text(json.dumps(TASKS))
    chammi = ["--protocol", "chammi", "--tasks", str(tasks), "--out", str(out / "chammi.json")]
    chammi += ["--scatter", str(out / "pca.png"), "--colour_by", "label,plate"]
    run(["evaluate_features.py", features, *chammi], out / "chammi.log")
    run(["evaluate_features.py", features, "--protocol", "knn", "--out", str(out / "knn.json")], out / "knn.log")
    profile = ["--protocol", "profile", "--well_column", "well", "--plate_column", "plate"]
    profile += ["--treatment_column", "label", "--control", "background", "--null_size", str(args.null_size)]
    run(["evaluate_features.py", features, *profile, "--out", str(out / "profile.json")], out / "profile.log")
    if seed in args.robustness_seeds:
        channels = ["--protocol", "channels", "--max_subsets", str(args.max_subsets)]
        channels += ["--out", str(out / "channels.json"), "--plot", str(out / "channels.png")]
        run(["evaluate_features.py", features, *channels], out / "channels.log")


def read_results(out_dirs: list) -> dict:
    """{config: {seed: {protocol: results}}} from every <config>_s<seed>/<protocol>.json under the out_dirs."""
    found = {}
    for path in sorted(p for d in out_dirs for p in Path(d).glob("*_s*/*.json")):
        if path.stem not in ("chammi", "knn", "profile", "channels"):
            continue
        config, _, seed = path.parent.name.rpartition("_s")
        found.setdefault(config, {}).setdefault(int(seed), {})[path.stem] = json.loads(path.read_text())["results"]
    return found


def spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    return f"{np.mean(values):.3f}" + (f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else "")


def report(out_dirs: list) -> str:
    """Markdown: one row per configuration, mean (min-max) over seeds; then accuracy against k (seed 0)."""
    found = read_results(out_dirs)
    lines = ["| encoder | seeds | " + " | ".join(c[3] for c in COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 2)]
    for config, seeds in found.items():
        cells = [spread([s.get(p, {}).get(t, {}).get(m) for s in seeds.values()]) for p, t, m, _ in COLUMNS]
        lines.append(f"| {config} | {len(seeds)} | " + " | ".join(cells) + " |")
    ks = sorted({k for seeds in found.values() for s in seeds.values() for k in s.get("channels", {})})
    if ks:
        lines += ["", "| encoder (1-NN top-1, seed 0) | " + " | ".join(ks) + " |", "|" + " --- |" * (len(ks) + 1)]
        for config, seeds in found.items():
            curve = seeds.get(min(seeds), {}).get("channels")
            if curve:
                lines.append(f"| {config} | " + " | ".join(f"{curve[k]['top1']:.1f}" for k in ks) + " |")
    return "\n".join(lines)


def plot_robustness(out_dirs: list, path: Path):
    """1-NN top-1 against k of every configuration with a channels.json (its lowest seed) into one PNG."""
    curves = {}
    for config, seeds in read_results(out_dirs).items():
        runs = [seeds[s]["channels"] for s in sorted(seeds) if "channels" in seeds[s]]
        if runs:
            curves[config] = {
                k.removeprefix("k="): {"mean": r["top1"], "min": r["top1_min"], "max": r["top1_max"]}
                for k, r in runs[0].items()
            }
    if curves:
        plot_curves(curves, str(path), "1-NN top-1 (%)", "IHC crops: channels given")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=["pretrain", "evaluate", "report"])
    parser.add_argument("--data", default="/tmp/ihc_labelled")
    parser.add_argument("--out_dir", default="/tmp/boc")
    parser.add_argument("--also", default=[], nargs="*", help="--stage report: more output dirs to read")
    parser.add_argument("--seeds", default=[0, 1], type=int, nargs="+")
    parser.add_argument("--configs", default=[*CONFIGS, "raw_pixels"], nargs="+", choices=[*CONFIGS, "raw_pixels"])
    parser.add_argument("--epochs", default=60, type=int, help="9 steps per epoch at batch 64 on 624 crops")
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--blr", default=1.5e-3, type=float)
    parser.add_argument("--model_kwargs", default=MODEL_KWARGS, nargs="+")
    parser.add_argument("--max_subsets", default=3, type=int, help="channel subsets per size k")
    parser.add_argument("--robustness_seeds", default=[0], type=int, nargs="*", help="seeds given --protocol channels")
    parser.add_argument("--null_size", default=200, type=int, help="mAP null distribution size")
    args = parser.parse_args()
    if args.stage == "report":
        dirs = [args.out_dir, *args.also]
        print(report(dirs))
        plot_robustness(dirs, Path(args.out_dir) / "robustness.png")
        return
    for seed in args.seeds:
        for name in args.configs:
            if args.stage == "pretrain" and name == "raw_pixels":
                continue
            print(f"{args.stage} {name} seed {seed}", flush=True)
            (pretrain if args.stage == "pretrain" else evaluate)(args, name, seed)


if __name__ == "__main__":
    main()
