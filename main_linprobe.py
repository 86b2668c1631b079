"""Linear probing: a frozen pretrained encoder, a trainable BatchNorm (no affine) + linear head, LARS.

As in MAE's linear-probing recipe: the class token is used by default (``--global_pool`` to average the patch
tokens), no weight decay, no mixup, label smoothing or erasing. ``--blr`` scales by effective batch / 256 as in
MAE; without ``--blr``/``--lr`` the lr is the recipe's 6.4 (blr 0.1 at its effective batch of 16384) at any batch:
LARS moves a weight matrix by lr x 1e-3 of its norm per step, whatever the gradient's size, so the recipe's
per-step update is kept, where MAE's scaling would shrink it by 16384 / batch (512-fold at a batch of 32) and
leave the head of a small-data probe at its random initialisation.
"""

import math

import torch
from timm.layers import trunc_normal_

from engine_finetune import build_data, fit
from models_checkpoint import build_classifier, load_pretrained
from models_flags import CHECKPOINT_EPILOG, DEFAULTS, add_model_args, resolve_checkpoint_flags
from models_vit import probe_head
from util.amp import NativeScaler
from util.cli import add_common_args, describe_optimizer, run_main, setup_run
from util.data.errors import DatasetError
from util.distributed import wrap_model
from util.flags import ArgumentParser
from util.lars import LARS
from util.optim import scale_lr
from util.trainer import TrainState

LINPROBE_DEFAULTS = {**DEFAULTS, "global_pool": False}
"""The defaults of main_finetune (``models_flags.DEFAULTS``), with the class token."""
RECIPE_LR = 0.1 * 16384 / 256
"""MAE's linear-probing lr: ``--blr 0.1`` at its effective batch of 16384."""


def get_args_parser():
    parser = ArgumentParser(
        "Linear probing of a pretrained encoder",
        add_help=False,
        epilog=CHECKPOINT_EPILOG,
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
        default=None,
        type=float,
        metavar="LR",
        help=f"base lr for an effective batch of 256 (MAE's recipe: 0.1 at a batch of 16384); default: lr "
        f"{RECIPE_LR:g}, the recipe's, at any batch (LARS steps are relative to the weight norm)",
    )
    g.add_argument("--min_lr", default=0.0, type=float, metavar="LR", help="lr floor of the cosine schedule")
    g.add_argument("--warmup_epochs", default=2, type=int, metavar="N")
    g.add_argument("--clip_grad", default=None, type=float, metavar="NORM", help="clip the gradient norm")

    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate --resume and exit")
    g.add_argument("--dist_eval", action="store_true", help="distributed evaluation (each process a shard)")

    add_common_args(parser)
    # plain RandomResizedCrop + flip for training: none of fine-tuning's RandAugment / erasing / mixup
    # data_path, input_size: LINPROBE_DEFAULTS after the checkpoint's (models_flags.CHECKPOINT_EPILOG)
    parser.set_defaults(data_path=None, input_size=None, aa=None, color_jitter=None, reprob=0.0)
    return parser


def head_travel(optimizer: LARS, steps: int, lr: float | None = None) -> float:
    """About how far ``steps`` LARS steps of the warmup + cosine schedule peaking at ``lr`` (default: the
    optimizer's) can move the head's weight matrix, in units of its norm: at most lr x trust coefficient /
    (1 - momentum) of it per step, at a mean lr of half the peak."""
    group = optimizer.param_groups[0]
    lr = group["lr"] if lr is None else lr
    return lr * group["trust_coefficient"] * steps / (2 * (1 - group["momentum"]))


def warn_if_head_stays(optimizer: LARS, epochs: int, steps_per_epoch: int, eff_batch_size: int):
    """Print a warning with the lr or the epochs to use when LARS cannot move the head far from its random
    initialisation (``head_travel`` below 1)."""
    steps = epochs * steps_per_epoch
    travel = head_travel(optimizer, steps)
    if travel >= 1:
        return
    travel_at_recipe_lr = head_travel(optimizer, steps, RECIPE_LR)
    if travel_at_recipe_lr >= 1:
        advice = f"leave --lr/--blr out for lr {RECIPE_LR:g} (--blr {RECIPE_LR * 256 / eff_batch_size:.3g} here)"
    else:
        needed = math.ceil(epochs / travel_at_recipe_lr)
        advice = f"at lr {RECIPE_LR:g} (no --lr/--blr) it needs --epochs {needed} or more"
    print(
        f"WARNING: lr {optimizer.param_groups[0]['lr']:.3g} for {steps} LARS steps moves the head by at most about "
        f"{travel:.2g} x its norm, so it stays near its random initialisation; {advice}"
    )


def main(args):
    checkpoints = resolve_checkpoint_flags(args, LINPROBE_DEFAULTS)
    device = setup_run(args)
    print("\n".join(checkpoints.sources))
    if args.hcs:
        print(
            "WARNING: --hcs in linear probing: ChannelViT's authors advise against it; train the probe on all "
            "channels and evaluate channel subsets with --eval --channels"
        )
    data = build_data(args, device, checkpoints.stats, checkpoints.vocabulary, checkpoints.resumed)

    num_channels = len(args.vocabulary["channel_names"])
    model = build_classifier(args, data[0].in_chans, num_channels, checkpoints.reference, global_pool=args.global_pool)
    if checkpoints.pretrained is not None:
        load_pretrained(model, checkpoints.pretrained, args.finetune)
    trunc_normal_(model.head.weight, std=0.01)
    model.head = probe_head(model.head)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model = {args.model}, {n_parameters} trainable parameters (the head)")

    if args.lr is None and args.blr is None:
        args.lr = RECIPE_LR
        print(f"lr {RECIPE_LR:g} (no --blr/--lr): MAE's linear-probing lr at its batch of 16384, at any batch")
    eff_batch_size = scale_lr(args)
    optimizer = LARS(model_without_ddp.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if not args.eval:
        warn_if_head_stays(optimizer, args.epochs, len(data[1]) // args.accum_iter, eff_batch_size)
    loss_scaler = NativeScaler(device, args.amp)
    criterion = torch.nn.CrossEntropyLoss()
    print(f"AMP: {args.amp}; {describe_optimizer(optimizer)}")

    model, eval_model = wrap_model(model, args, device)
    state = TrainState(args, model, model_without_ddp, optimizer, loss_scaler, device, data[3], eval_model)
    return fit(state, data, criterion)


if __name__ == "__main__":
    parser = get_args_parser()
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    args = parser.parse_args()
    run_main(main, args, errors=(DatasetError,))
