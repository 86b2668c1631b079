"""Supervised fine-tuning of ViT / ChannelViT classifiers, optionally from an MAE or ChannelMAE checkpoint.

``--finetune ckpt`` loads a pretraining checkpoint (ours, or a published MAE file: a state dict under 'model')
into the encoder; ``--eval --resume ckpt`` scores a checkpoint and exits. With no flags it trains a tiny ChannelViT
on the bundled ``sample_data/digits``. Flags that belong to a checkpoint default to its values (``CHECKPOINT_EPILOG``).
"""

import argparse
import json
import os
import time
from dataclasses import dataclass, field

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import adapt_input_conv
from timm.optim import param_groups_layer_decay

import models_vit
import util.misc as misc
from engine_finetune import evaluate, train_one_epoch
from util.checkpoint_io import (
    check_architecture,
    checkpoint_input_size,
    classifier_name,
    encoder_kwargs,
    split_checkpoint,
)
from util.data.builders import build_dataset
from util.data.errors import DatasetError
from util.data.evaluation import DATA_FLAGS, inherit_args
from util.data.stats import normalization_record
from util.pos_embed import interpolate_pos_embed

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
HEAD_KEYS = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
DROPPABLE_PREFIXES = ("norm.", "fc_norm.", "head.")
"""Pretrained keys a classifier may lack: the final norm (fc_norm replaces it under global pooling) and heads."""

DEFAULTS = dict(
    model="channelvit_tiny_patch16",
    input_size=32,
    data_path=os.path.join(REPO_DIR, "sample_data", "digits"),
    global_pool=True,
)
"""Values of the flags that default to the checkpoint's, for a run without a checkpoint (or one recording none)."""

MODEL_FLAGS = ("model", "model_kwargs", "input_size")
"""Taken from the checkpoint the model is shaped after (--resume, else --finetune) unless given."""

RESUME_FLAGS = (*DATA_FLAGS, "global_pool")
"""Also taken from a checkpoint that is resumed or evaluated (--resume): the data and pooling it was trained with."""

CHECKPOINT_EPILOG = """\
defaults from the checkpoint:
  --model, --model_kwargs (per key) and --input_size default to those of the checkpoint the model is shaped after
  (--resume, else --finetune; a pretraining model gives the classifier of its family, a file without recorded
  arguments its position embedding's size). A resumed or evaluated checkpoint (--resume) also gives --data_path,
  --channels, --mean, --std, --channel_stats and --global_pool. A flag given wins; the log says where each value
  came from. A head count other than the checkpoint's (--model_kwargs num_heads=N) is refused: it does not show
  in the weights. --eval needs --resume.

normalisation (per channel, raw units; the first that applies):
  --mean/--std; --channel_stats; channel_stats.json in the data root; the statistics the checkpoint recorded
  (same channel count and pixel type); ImageNet mean/std for 8-bit RGB images; else estimated from up to 256
  training samples, with a warning. 8-bit RGB images (colour PNG/JPEG files, or 3 channels named R, G, B in
  channels.txt) also get timm's RandAugment / colour jitter / random erasing when training; other data, 3-band
  8-bit TIFF or NPY included, get random-resized crops and flips.
"""


def add_model_args(parser):
    """Model flags shared with main_linprobe."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        choices=models_vit.FINETUNE_MODELS,
        metavar="MODEL",
        help=f"default: the checkpoint's, else {DEFAULTS['model']}",
    )
    g.add_argument(
        "--patch_size", default=None, type=int, help="override the patch size (default: the checkpoint's, or --model's)"
    )
    g.add_argument(
        "--model_kwargs",
        default=[],
        nargs="*",
        metavar="KEY=VALUE",
        help="other model overrides, e.g. depth=2 (default: the checkpoint's)",
    )
    g.add_argument("--hcs", action="store_true", help="hierarchical channel sampling in training (ChannelViT)")
    g.add_argument("--finetune", default="", help="initialise the encoder from this pretraining checkpoint")
    g.add_argument("--nb_classes", default=None, type=int, help="number of classes (default: from the dataset)")
    return g


def get_args_parser():
    parser = argparse.ArgumentParser(
        "ViT / ChannelViT fine-tuning for image classification",
        add_help=False,
        epilog=CHECKPOINT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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

    misc.add_common_args(parser)
    parser.set_defaults(data_path=None, input_size=None)  # DEFAULTS, after the checkpoint's (CHECKPOINT_EPILOG)
    return parser


def read_checkpoint(path: str, args) -> tuple[dict, dict]:
    """(model state dict, recorded args ({} if none)) of a checkpoint file: ours, MAE's ({'model': state_dict},
    maybe with a Namespace of args) or a bare state dict."""
    state_dict, checkpoint_args = split_checkpoint(misc.load_checkpoint(path, unsafe=args.unsafe_load), path)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise misc.CheckpointError(f"{path} holds no model state dict (expected a dict of tensors under 'model')")
    return state_dict, checkpoint_args


@dataclass
class Checkpoints:
    """What a run takes from its checkpoints (``resolve_checkpoint_flags``).

    reference: the state dict the model is shaped after (--resume, else --finetune), or None; pretrained: the
    --finetune state dict to load, or None; stats: the normalisation the reference recorded (``args.normalization``);
    sources: lines saying where the flags that belong to a checkpoint took their values from.
    """

    reference: dict | None = None
    pretrained: dict | None = None
    stats: dict | None = None
    sources: list[str] = field(default_factory=list)


def _flag_text(key, value) -> str:
    """'--key value' as on a command line."""
    if isinstance(value, list | tuple):
        value = " ".join(map(str, value))
    return f"--{key} {value}"


def take_checkpoint_flags(args, checkpoint_args, state_dict, path, resumed) -> dict:
    """Fill the unset flags that belong to the checkpoint at ``path``: --model (the classifier of its family),
    the --model_kwargs keys not given, --input_size and, when ``resumed``, ``RESUME_FLAGS``. Returns {flag: value}
    of what was taken."""
    taken = {}
    if args.model is None and checkpoint_args.get("model"):
        args.model = taken["model"] = classifier_name(checkpoint_args["model"])
        if args.model not in models_vit.FINETUNE_MODELS:
            raise misc.CheckpointError(f"{path} was trained as '{checkpoint_args['model']}': pass --model")
    given = misc.parse_model_kwargs(args.model_kwargs)
    recorded = [f"{k}={v!r}" for k, v in encoder_kwargs(checkpoint_args).items() if k not in given]
    if recorded:
        args.model_kwargs = [*recorded, *args.model_kwargs]
        taken["model_kwargs"] = recorded
    input_size = checkpoint_input_size(checkpoint_args, state_dict)
    if args.input_size is None and input_size:
        args.input_size = taken["input_size"] = input_size
    if resumed:
        taken.update({key: getattr(args, key) for key in inherit_args(args, checkpoint_args, RESUME_FLAGS)})
    return taken


def resolve_checkpoint_flags(args, defaults: dict = DEFAULTS) -> Checkpoints:
    """Refuse --eval without a checkpoint, read the checkpoints and fill the flags left unset, before any compute.

    Unset flags take the values of the checkpoint the model is shaped after (``take_checkpoint_flags``), then
    ``defaults``. A head count other than the checkpoint's is refused (``check_architecture``).
    """
    resume = misc.resolve_resume(args)
    if args.eval and not resume:
        raise misc.RunError(
            "--eval scores a checkpoint, and none was given: pass --resume CHECKPOINT (--finetune only initialises "
            "training)"
        )
    given = {key: getattr(args, key) for key in (*MODEL_FLAGS, *RESUME_FLAGS) if getattr(args, key) not in (None, [])}
    found = Checkpoints()
    if args.finetune and not args.eval:
        found.pretrained, checkpoint_args = read_checkpoint(args.finetune, args)
        found.reference = found.pretrained
    if resume:
        found.reference, checkpoint_args = read_checkpoint(resume, args)
    path = resume or args.finetune
    if found.reference is not None:
        taken = take_checkpoint_flags(args, checkpoint_args, found.reference, path, resumed=bool(resume))
        found.stats = checkpoint_args.get("normalization")
        flags = " ".join(_flag_text(*kv) for kv in taken.items())
        found.sources.append(f"From the checkpoint {path}: {flags or '-'}")
    defaulted = {key: value for key, value in defaults.items() if getattr(args, key) is None}
    for key, value in defaulted.items():
        setattr(args, key, value)
    if found.reference is not None:
        own = misc.parse_model_kwargs(given.get("model_kwargs"))
        check_architecture(path, checkpoint_args, args.model, misc.parse_model_kwargs(args.model_kwargs), own)
    for title, values in (("From the command line", given), ("Defaults", defaulted)):
        if values:
            found.sources.append(f"{title}: " + " ".join(_flag_text(*kv) for kv in values.items()))
    return found


def build_model(args, dataset, reference_state: dict | None = None, **overrides):
    """The classifier for ``args.model``; the patch size and number of channel embeddings follow
    ``reference_state`` (the checkpoint to be loaded) unless ``--patch_size`` says otherwise."""
    num_channels = misc.num_known_channels(dataset)
    kwargs = dict(img_size=args.input_size, in_chans=dataset.in_chans, num_classes=args.nb_classes, hcs=args.hcs)
    if reference_state is not None:
        if "channel_embed" in reference_state:
            num_channels = max(num_channels, reference_state["channel_embed"].shape[0])
        if args.patch_size is None and "patch_embed.proj.weight" in reference_state:
            kwargs["patch_size"] = reference_state["patch_embed.proj.weight"].shape[-1]
    if args.patch_size:
        kwargs["patch_size"] = args.patch_size
    kwargs.update(num_channels=num_channels, **overrides)
    kwargs.update(misc.parse_model_kwargs(args.model_kwargs))
    return models_vit.create_model(args.model, **kwargs)


def load_pretrained(model, state_dict: dict, path: str = ""):
    """Load a pretraining state dict into a classifier, MAE style.

    Decoder weights and the mask token are dropped, a head of the wrong shape is dropped, the position
    embedding is resampled to the model's grid, a patch projection with a different number of input planes is
    adapted (timm's ``adapt_input_conv``). Only head/fc_norm (and channel_embed when the checkpoint has none)
    may be missing, and only the final norm and heads (``DROPPABLE_PREFIXES``) may be left over: a per-channel
    encoder does not go into a ViT, nor a deeper one into a shallower model. A freshly initialised head gets
    ``trunc_normal_(std=2e-5)``. Returns load_state_dict's result.
    """
    print(f"Load pre-trained checkpoint from: {path}")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("decoder_") and k not in ("mask_token",)}
    model_state = model.state_dict()
    if "channel_embed" in state_dict and "channel_embed" not in model_state:
        raise misc.CheckpointMismatchError(
            f"{path or 'the pretrained checkpoint'} holds a ChannelMAE / ChannelViT encoder (one token per channel "
            f"and patch), which a {type(model).__name__} does not take: use a channelvit_* --model, or leave --model "
            "out to build the checkpoint's"
        )
    for key in ("head.weight", "head.bias"):
        if key in state_dict and state_dict[key].shape != model_state[key].shape:
            print(f"Removing key {key} from pretrained checkpoint (shape {tuple(state_dict[key].shape)})")
            del state_dict[key]
    key = "patch_embed.proj.weight"
    if key in state_dict and state_dict[key].shape[1] != model_state[key].shape[1]:
        print(f"Adapting {key} from {state_dict[key].shape[1]} to {model_state[key].shape[1]} input planes")
        state_dict[key] = adapt_input_conv(model_state[key].shape[1], state_dict[key])
    interpolate_pos_embed(model, state_dict)
    allowed = set(HEAD_KEYS)
    if "channel_embed" not in state_dict:
        allowed.add("channel_embed")
    checked = {k: v for k, v in state_dict.items() if k in model_state or not k.startswith(DROPPABLE_PREFIXES)}
    misc.check_state_dict(model, checked, path or "the pretrained checkpoint", allowed)
    msg = model.load_state_dict(state_dict, strict=False)
    print(f"missing keys: {msg.missing_keys}\nunexpected keys: {msg.unexpected_keys}")
    if "head.weight" in msg.missing_keys:
        trunc_normal_(model.head.weight, std=2e-5)
    return msg


def log_eval(test_stats: dict):
    print(f"Accuracy of the network on the {test_stats['n']} test images: {test_stats['acc1']:.2f}%")


def build_data(args, device, checkpoint_stats: dict | None = None):
    """(train dataset, train loader (None under --eval), val loader, channel ids (C,)); sets ``args.nb_classes``
    when not given and ``args.normalization`` (saved with the checkpoints). checkpoint_stats: the checkpoint's
    recorded normalisation."""
    dataset_train = build_dataset(True, args, checkpoint_stats)
    dataset_val = build_dataset(False, args, checkpoint_stats)
    print(misc.describe_dataset("train", dataset_train))
    print(misc.describe_dataset("val", dataset_val))
    args.normalization = normalization_record(dataset_train)
    if args.nb_classes is None:
        args.nb_classes = dataset_train.nb_classes
    channel_ids = torch.as_tensor(dataset_train.channel_ids, dtype=torch.long, device=device)
    loader_train = None if args.eval else misc.build_train_loader(dataset_train, args)
    loader_val = misc.build_eval_loader(dataset_val, args)
    return dataset_train, loader_train, loader_val, channel_ids


def fit(args, model, model_without_ddp, eval_model, criterion, optimizer, loss_scaler, data, device, mixup_fn=None):
    """Resume if asked, then evaluate once (``--eval``) or train, evaluating and checkpointing every epoch.

    ``model`` is the training module (maybe DDP / compiled), ``eval_model`` the same weights without DDP;
    ``data`` is ``build_data``'s result. Keeps ``checkpoint-best.pth`` for the best top-1 accuracy. Returns the
    last test stats.
    """
    _, data_loader_train, data_loader_val, channel_ids = data
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    checkpoint = misc.load_model(args, model_without_ddp, optimizer, loss_scaler)
    max_accuracy = checkpoint.get("max_accuracy", 0.0) if checkpoint and not args.eval else 0.0
    progress = misc.resume_progress(checkpoint, args)

    if args.eval:
        test_stats = evaluate(data_loader_val, eval_model, device, args, channel_ids)
        log_eval(test_stats)
        print(json.dumps({f"test_{k}": v for k, v in test_stats.items()}))
        misc.cleanup_distributed()
        return test_stats

    log_writer = misc.open_log_writer(args)
    misc.install_stop_handlers()
    print(f"Start training for {args.epochs} epochs")
    test_stats = {}
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        misc.set_loader_epoch(data_loader_train, epoch, args, progress)
        try:
            train_stats = train_one_epoch(
                model,
                criterion,
                data_loader_train,
                optimizer,
                device,
                epoch,
                loss_scaler,
                args.clip_grad,
                mixup_fn,
                log_writer=log_writer,
                args=args,
                channel_ids=channel_ids,
                progress=progress,
            )
        except misc.TrainingStopped as stop:  # SIGTERM / SIGUSR1: save mid-epoch, then exit (misc.run_main)
            extra = {"max_accuracy": max_accuracy}
            misc.save_stopped(stop, args, epoch, model_without_ddp, optimizer, loss_scaler, log_writer, extra)
            raise
        progress = None
        test_stats = evaluate(data_loader_val, eval_model, device, args, channel_ids)
        log_eval(test_stats)
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f"Max accuracy: {max_accuracy:.2f}%")
        extra = {"max_accuracy": max_accuracy, "test_acc1": test_stats["acc1"]}
        path = misc.save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra)
        if improved:
            misc.save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra, tag="best")

        if log_writer is not None:
            for key in ("acc1", "acc5", "loss"):
                if key in test_stats:
                    log_writer.add_scalar(f"test_{key}", test_stats[key], epoch)
        log_stats = {
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in test_stats.items()},
            "epoch": epoch,
            "n_parameters": n_parameters,
            **misc.skip_stats(data[0]),
        }
        misc.write_log(args, log_stats, log_writer)
        misc.stop_after_epoch(args, epoch, path)

    misc.end_training(start_time, log_writer)
    return test_stats


def main(args):
    checkpoints = resolve_checkpoint_flags(args)
    device = misc.setup_run(args)
    print("\n".join(checkpoints.sources))
    data = build_data(args, device, checkpoints.stats)

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

    model = build_model(
        args, data[0], checkpoints.reference, drop_path_rate=args.drop_path, global_pool=args.global_pool
    )
    if checkpoints.pretrained is not None:
        load_pretrained(model, checkpoints.pretrained, args.finetune)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model = {args.model}, {n_parameters / 1e6:.2f}M trainable parameters")

    misc.scale_lr(args)
    param_groups = param_groups_layer_decay(
        model_without_ddp, args.weight_decay, model_without_ddp.no_weight_decay(), layer_decay=args.layer_decay
    )
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr)
    loss_scaler = misc.NativeScaler(device, args.amp)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0.0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print(f"AMP: {args.amp}; criterion: {criterion}; {misc.describe_optimizer(optimizer)}")

    model, eval_model = misc.wrap_model(model, args, device)
    return fit(args, model, model_without_ddp, eval_model, criterion, optimizer, loss_scaler, data, device, mixup_fn)


if __name__ == "__main__":
    parser = get_args_parser()
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    args = parser.parse_args()
    misc.run_main(main, args, errors=(DatasetError,))
