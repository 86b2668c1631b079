"""Supervised fine-tuning of ViT / ChannelViT classifiers, optionally from an MAE or ChannelMAE checkpoint.

``--finetune ckpt`` loads a pretraining checkpoint (ours, or a published MAE file: a state dict under 'model')
into the encoder; ``--eval --resume ckpt`` scores a checkpoint and exits. With no flags it trains a tiny ChannelViT
on the bundled ``sample_data/digits``. Flags that belong to a checkpoint default to its values (``CHECKPOINT_EPILOG``).
"""

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay

from engine_finetune import build_data, fit
from models_checkpoint import build_classifier, load_pretrained
from models_flags import CHECKPOINT_EPILOG, add_model_args, resolve_checkpoint_flags
from util.amp import NativeScaler
from util.cli import add_common_args, describe_optimizer, run_main, setup_run
from util.data.device_augment import add_gpu_augment_arg
from util.data.errors import DatasetError
from util.distributed import wrap_model
from util.fast_paths import adamw_kwargs
from util.flags import ArgumentParser
from util.optim import scale_lr
from util.trainer import TrainState


def get_args_parser():
    parser = ArgumentParser(
        "ViT / ChannelViT fine-tuning for image classification",
        add_help=False,
        epilog=CHECKPOINT_EPILOG,
    )
    parser.add_argument("--batch_size", default=64, type=int, help="batch size per process")
    parser.add_argument("--epochs", default=20, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    g = add_model_args(parser)
    g.add_argument("--drop_path", default=0.1, type=float, metavar="PCT", help="drop path rate")
    g.add_argument("--global_pool", action="store_true", help="average the patch tokens (default)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify from the class token")
    parser.set_defaults(global_pool=None)

    g = parser.add_argument_group("optimizer")
    g.add_argument("--clip_grad", default=None, type=float, metavar="NORM", help="clip the gradient norm")
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--lr", default=None, type=float, metavar="LR", help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument("--blr", default=1e-3, type=float, metavar="LR", help="base lr for an effective batch of 256")
    g.add_argument("--layer_decay", default=0.75, type=float, help="layer-wise lr decay")
    g.add_argument("--min_lr", default=1e-6, type=float, metavar="LR", help="lr floor of the cosine schedule")
    g.add_argument("--warmup_epochs", default=2, type=int, metavar="N")

    g = parser.add_argument_group("augmentation (timm's RandAugment/RandomErasing for 8-bit RGB images only)")
    g.add_argument("--color_jitter", default=None, type=float, metavar="PCT")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str, metavar="NAME", help="AutoAugment policy")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--reprob", default=0.25, type=float, metavar="PCT", help="random erase probability")
    g.add_argument("--remode", default="pixel", type=str, help="random erase mode")
    g.add_argument("--recount", default=1, type=int, help="random erase count")
    g.add_argument("--resplit", action="store_true", default=False, help="no random erasing on the first split")

    g = parser.add_argument_group("mixup / cutmix")
    g.add_argument("--mixup", default=0, type=float, help="mixup alpha (enabled if > 0)")
    g.add_argument("--cutmix", default=0, type=float, help="cutmix alpha (enabled if > 0)")
    g.add_argument("--cutmix_minmax", default=None, type=float, nargs="+", help="cutmix min/max ratio")
    g.add_argument("--mixup_prob", default=1.0, type=float, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix when both are on")
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])

    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate --resume and exit")
    g.add_argument("--dist_eval", action="store_true", help="distributed evaluation (each process a shard)")

    add_common_args(parser)
    add_gpu_augment_arg(parser)
    parser.set_defaults(data_path=None, input_size=None)  # DEFAULTS, after the checkpoint's (CHECKPOINT_EPILOG)
    return parser


def main(args):
    checkpoints = resolve_checkpoint_flags(args)
    device = setup_run(args)
    print("\n".join(checkpoints.sources))
    data = build_data(args, device, checkpoints.stats, checkpoints.vocabulary, checkpoints.resumed)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        print("Mixup is activated")
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=args.nb_classes,
        )

    model = build_classifier(
        args,
        data[0].in_chans,
        len(args.vocabulary["channel_names"]),
        checkpoints.reference,
        drop_path_rate=args.drop_path,
        global_pool=args.global_pool,
    )
    if checkpoints.pretrained is not None:
        load_pretrained(model, checkpoints.pretrained, args.finetune)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model = {args.model}, {n_parameters / 1e6:.2f}M trainable parameters")

    scale_lr(args)
    param_groups = param_groups_layer_decay(
        model_without_ddp, args.weight_decay, model_without_ddp.no_weight_decay(), layer_decay=args.layer_decay
    )
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, **adamw_kwargs(device, not args.no_fast_paths))
    loss_scaler = NativeScaler(device, args.amp)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0.0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print(f"AMP: {args.amp}; criterion: {criterion}; {describe_optimizer(optimizer)}")

    model, eval_model = wrap_model(model, args, device)
    state = TrainState(args, model, model_without_ddp, optimizer, loss_scaler, device, data[3], eval_model)
    return fit(state, data, criterion, mixup_fn)


if __name__ == "__main__":
    parser = get_args_parser()
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    args = parser.parse_args()
    run_main(main, args, errors=(DatasetError,))
