"""Export a checkpoint as a model folder, ``model.safetensors`` + ``config.json`` (huggingface_hub's layout), to share
a trained model: everything needed to rebuild and use it without the training arguments (``util/model_folder.py``).

Reads any checkpoint (pretraining, fine-tuned, linear probe; ours or MAE's published files, which need --model);
``--finetune``, ``--eval --resume``, visualize.py, extract_features.py and hubconf.py take the folder in its place.

    python export_model.py --resume output_dir/checkpoint-last.pth --out my_model
    python export_model.py --resume output_dir/checkpoint-last.pth --no_decoder --out my_encoder
    python export_model.py --resume mae_pretrain_vit_base.pth --model vit_base_patch16 --out mae_base \\
        --channel_names R G B --mean 123.675 116.28 103.53 --std 58.395 57.12 57.375
"""

import os

from models_folder import export
from util.cli import FloatListAction, parse_model_kwargs, run_main
from util.errors import RunError
from util.flags import ArgumentParser
from util.model_folder import write_model_folder


def get_args_parser():
    parser = ArgumentParser("Model folder export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", required=True, help="checkpoint file (or model folder) to export")
    parser.add_argument("--out", required=True, help="output folder (created; its two files are replaced)")
    parser.add_argument("--no_decoder", action="store_true", help="keep the encoder only (a vit_* / channelvit_*)")
    parser.add_argument(
        "--no_training_args",
        action="store_true",
        help="leave the training run's flags (paths on its machine included) out of config.json",
    )
    g = parser.add_argument_group("model (for files that record no arguments, e.g. published MAE files)")
    g.add_argument("--model", default=None, help="model name (checked against a recorded one's family)")
    g.add_argument("--model_kwargs", default=[], nargs="*", metavar="KEY=VALUE", help="e.g. num_heads=2")
    g.add_argument("--unsafe_load", action="store_true", help="full unpickling (trusted files only)")
    g = parser.add_argument_group("channels (default: the checkpoint's, else ch<id> and unknown statistics)")
    g.add_argument("--channel_names", default=None, nargs="+", help="one name per embedding row / input plane")
    g.add_argument("--mean", default=None, nargs="+", action=FloatListAction, help="per-row mean, raw units")
    g.add_argument("--std", default=None, nargs="+", action=FloatListAction, help="per-row std, raw units")
    return parser


def main(args):
    if os.path.isfile(args.out):
        raise RunError(f"--out {args.out} is a file; model folders are directories")
    if (args.mean is None) != (args.std is None):
        raise RunError("--mean and --std must be given together")
    channels = dict(names=args.channel_names, mean=args.mean, std=args.std)
    model, config = export(
        args.resume,
        model=args.model,
        no_decoder=args.no_decoder,
        unsafe=args.unsafe_load,
        channels=channels,
        **parse_model_kwargs(args.model_kwargs),
    )
    if args.no_training_args:
        config["training_args"] = None
    try:
        paths = write_model_folder(args.out, model.state_dict(), config)
    except OSError as err:
        raise RunError(f"could not write the model folder --out {args.out}: {err}") from err
    decoder = f"{config['decoder']['kind']} decoder" if config["decoder"] else "no decoder"
    head = f"{config['num_classes']} classes" if config["num_classes"] else "no head"
    names = ", ".join(c["name"] for c in config["channels"])
    print(f"{config['model']} ({decoder}, {head}), {config['img_size']} px, patch {config['patch_size']}")
    print(f"channels: {names}")
    for path in paths:
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    return config


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
