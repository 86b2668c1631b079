"""Draw MAE / ChannelMAE reconstructions of a few images into one PNG and print the per-channel masked MSE (in the
loss's target space: normalised pixels, or per-patch normalised ones under --norm_pix_loss).

For each sample, one row per channel: original, masked input, reconstruction, reconstruction with the visible
patches pasted back; every row contrast-stretched (1st-99th percentile of its original channel); for 3 channels
(or --rgb) an extra RGB composite row. Reads our checkpoints (model and data flags from their 'args') and the
published MAE files with a decoder (``mae_visualize_vit_*.pth``, ``*_full.pth``; pass --model).

    python visualize.py --resume output_dir/checkpoint-last.pth --out recon.png
    python visualize.py --resume mae_visualize_vit_large.pth --model mae_vit_large_patch16 \\
        --data_path imagenet/val --split pretrain --out recon.png
"""

import argparse

import torch

from models_checkpoint import model_from_checkpoint
from models_preflight import check_model_channels, check_patch_grid
from util.cli import add_reading_args, parse_model_kwargs, run_main
from util.data.errors import DatasetError
from util.data.evaluation import SPLITS, eval_dataset, inherit_data_args
from util.distributed import default_device
from util.errors import CheckpointError
from util.features import channel_rows
from util.flags import ArgumentParser, Limit
from util.output_dir import check_output_file
from util.vis import channel_labels, fixed_batch, mse_space, reconstruction_grid, save_png


def parse_rgb(value):
    """'auto', 'none' or three comma-separated channel positions."""
    if value in ("auto", "none"):
        return value
    rgb = tuple(int(v) for v in value.split(","))
    if len(rgb) != 3:
        raise argparse.ArgumentTypeError(f"--rgb needs three channel positions, got '{value}'")
    return rgb


def get_args_parser():
    parser = ArgumentParser(
        "MAE / ChannelMAE reconstructions",
        description=__doc__.split("\n\n")[0],
        limits={"scale": Limit(1), "mask_ratio": Limit(0, 1, low_open=True, high_open=True)},
    )
    parser.add_argument("--resume", required=True, help="checkpoint with a decoder (ours, published MAE, model folder)")
    parser.add_argument("--out", default="recon.png", help="output PNG")
    parser.add_argument("--n", default=8, type=int, help="number of samples")
    parser.add_argument("--mask_ratio", default=None, type=float, help="default: the checkpoint's, else 0.75")
    parser.add_argument("--seed", default=0, type=int, help="seed of the random mask")
    parser.add_argument("--rgb", default="auto", type=parse_rgb, help="'auto' (3 channels), 'none' or e.g. '0,1,2'")
    parser.add_argument("--scale", default=None, type=int, help="tile enlargement (default: tiles >= 64 px)")
    parser.add_argument("--no_labels", action="store_true", help="tiles only, no text")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="model name (required for published files without 'args')")
    g.add_argument("--model_kwargs", default=[], nargs="*", metavar="KEY=VALUE", help="e.g. num_heads=2")
    g.add_argument("--input_size", default=None, type=int, help="default: the checkpoint's")
    g.add_argument(
        "--norm_pix_loss",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="whether the model predicts normalised patches (default: the checkpoint's, else no)",
    )
    g.add_argument("--mask_mode", default=None, help="ChannelMAE masking (default: the checkpoint's)")
    g.add_argument("--unsafe_load", action="store_true", help="full unpickling (trusted files only)")
    g.add_argument("--device", default=default_device())
    g = parser.add_argument_group("data (default: the checkpoint's flags)")
    g.add_argument("--data_path", default=None)
    g.add_argument("--split", default="pretrain", choices=SPLITS, help="pretraining layout or a labelled split")
    g.add_argument(
        "--channels", default=None, help="channels to read by name or file position, e.g. 'DNA,Mito' or '0,2,4'"
    )
    g.add_argument("--mean", default=None, type=float, nargs="+")
    g.add_argument("--std", default=None, type=float, nargs="+")
    g.add_argument("--channel_stats", default=None)
    add_reading_args(g)
    return parser


def main(args):
    overrides = parse_model_kwargs(args.model_kwargs)
    for key in ("norm_pix_loss", "mask_mode"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    model, info = model_from_checkpoint(
        args.resume, model=args.model, input_size=args.input_size, unsafe=args.unsafe_load, **overrides
    )
    if info["kind"] != "pretrain":
        raise CheckpointError(f"{args.resume} has no decoder; visualize.py needs a pretraining checkpoint")
    if args.input_size:
        check_patch_grid(args.input_size, model.patch_embed.patch_size[0], f"from {args.resume}")
    inherit_data_args(args, info["args"], model)
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else info["args"].get("mask_ratio", 0.75)
    check_output_file(args.out, "--out")
    dataset = eval_dataset(args, args.split, info["args"].get("normalization"))
    check_model_channels(model, dataset, args.channels)
    imgs = fixed_batch(dataset, args.n, args.seed).to(args.device)
    channel_ids = torch.as_tensor(channel_rows([dataset], info, args.resume, model), device=args.device)
    names = channel_labels(dataset)
    rgb = None if args.rgb == "none" else args.rgb
    grid, channel_mse = reconstruction_grid(
        model.to(args.device),
        imgs,
        channel_ids,
        mask_ratio,
        seed=args.seed,
        channel_names=names,
        rgb=rgb,
        labels=not args.no_labels,
        scale=args.scale,
    )
    save_png(grid, args.out)
    print(f"{info['name']} ({args.resume}), {len(imgs)} samples, mask ratio {mask_ratio}")
    print(f"masked MSE per channel ({mse_space(model)}):")
    for name, mse in zip(names, channel_mse):
        print(f"  {name}: {mse:.4f}")
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")
    return grid, channel_mse


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args(), errors=(DatasetError,))
