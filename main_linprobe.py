"""Linear probing: a frozen pretrained encoder, a trainable BatchNorm (no affine) + linear head, LARS.

As in MAE's linear-probing recipe: the class token is used by default (``--global_pool`` to average the patch
tokens), base lr 0.1 scaled by effective batch / 256, no weight decay, no mixup, label smoothing or erasing.
"""

import argparse

import torch
from timm.layers import trunc_normal_

import util.misc as misc
from main_finetune import (
    CHECKPOINT_EPILOG,
    DEFAULTS,
    add_model_args,
    build_data,
    build_model,
    fit,
    load_pretrained,
    resolve_checkpoint_flags,
)
from util.data.errors import DatasetError
from util.lars import LARS

LINPROBE_DEFAULTS = {**DEFAULTS, "global_pool": False}
"""main_finetune's defaults, with the class token."""


def get_args_parser():
    parser = argparse.ArgumentParser(
        "Linear probing of a pretrained encoder",
        add_help=False,
        epilog=CHECKPOINT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch_size", default=64, type=int, help="batch size per process")
    parser.add_argument("--epochs", default=20, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    g = add_model_args(parser)
    g.add_argument("--global_pool", action="store_true", help="average the patch tokens")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="use the class token (default)")
    parser.set_defaults(global_pool=None)

    g = parser.add_argument_group("optimizer")
    g.add_argument("--weight_decay", default=0.0, type=float)
    g.add_argument("--lr", default=None, type=float, metavar="LR", help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument(
        "--blr",
        default=0.1,
        type=float,
        metavar="LR",
        help="base lr for an effective batch of 256; MAE's 0.1 assumes a batch of 16384: LARS steps scale with the "
        "weight norm, so small batches need a much larger value (e.g. 25-50 at batch 64)",
    )
    g.add_argument("--min_lr", default=0.0, type=float, metavar="LR", help="lr floor of the cosine schedule")
    g.add_argument("--warmup_epochs", default=2, type=int, metavar="N")
    g.add_argument("--clip_grad", default=None, type=float, metavar="NORM", help="clip the gradient norm")

    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate --resume and exit")
    g.add_argument("--dist_eval", action="store_true", help="distributed evaluation (each process a shard)")

    misc.add_common_args(parser)
    # plain RandomResizedCrop + flip for training: none of fine-tuning's RandAugment / erasing / mixup
    # data_path, input_size: LINPROBE_DEFAULTS after the checkpoint's (main_finetune.CHECKPOINT_EPILOG)
    parser.set_defaults(data_path=None, input_size=None, aa=None, color_jitter=None, reprob=0.0)
    return parser


def main(args):
    checkpoints = resolve_checkpoint_flags(args, LINPROBE_DEFAULTS)
    device = misc.setup_run(args)
    print("\n".join(checkpoints.sources))
    data = build_data(args, device, checkpoints.stats)

    model = build_model(args, data[0], checkpoints.reference, global_pool=args.global_pool)
    if checkpoints.pretrained is not None:
        load_pretrained(model, checkpoints.pretrained, args.finetune)
    trunc_normal_(model.head.weight, std=0.01)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model = {args.model}, {n_parameters} trainable parameters (the head)")

    misc.scale_lr(args)
    optimizer = LARS(model_without_ddp.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_scaler = misc.NativeScaler(device, args.amp)
    criterion = torch.nn.CrossEntropyLoss()
    print(f"AMP: {args.amp}; {misc.describe_optimizer(optimizer)}")

    model, eval_model = misc.wrap_model(model, args, device)
    return fit(args, model, model_without_ddp, eval_model, criterion, optimizer, loss_scaler, data, device)


if __name__ == "__main__":
    parser = get_args_parser()
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    args = parser.parse_args()
    misc.run_main(main, args, errors=(DatasetError,))
