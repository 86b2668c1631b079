"""Masked-autoencoder pretraining (MAE or ChannelMAE).

With no flags at all it pretrains a tiny ChannelMAE on the bundled ``sample_data/ihc`` tiles, on CUDA when present,
else on the CPU, writing checkpoints, ``log.txt`` (one JSON line per epoch) and TensorBoard events to ./output_dir.
"""

import os

import torch

import models_chamae
import util.vis as vis
from engine_pretrain import train_one_epoch
from models_checkpoint import build_pretrain_model
from models_preflight import check_patch_grid, check_pretrain_resume, model_patch_size
from util.amp import NativeScaler
from util.bag_of_channels import SingleChannelDataset
from util.checkpoint import checkpoint_channel_names, load_checkpoint, resolve_resume
from util.cli import (
    add_common_args,
    describe_dataset,
    describe_optimizer,
    run_main,
    setup_run,
)
from util.data.device_augment import add_gpu_augment_arg, training_items
from util.data.errors import DatasetError
from util.data.sources import MixedDataset, build_pretrain_sources, names_record
from util.data.stats import normalization_record
from util.data.vocabulary import assign_vocabulary, is_positional, union_vocabulary, vocabulary_record
from util.distributed import get_rank, is_main_process, wrap_model
from util.errors import RunError
from util.fast_paths import adamw_kwargs
from util.flags import ArgumentParser
from util.loaders import build_train_loader
from util.optim import pretrain_param_groups, scale_lr
from util.trainer import TrainState, fit

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    parser = ArgumentParser("MAE / ChannelMAE pre-training", add_help=False)
    parser.add_argument("--batch_size", default=64, type=int, help="batch size per process")
    parser.add_argument("--epochs", default=20, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="chamae_vit_tiny_patch16", choices=models_chamae.PRETRAIN_MODELS, metavar="MODEL")
    g.add_argument("--patch_size", default=None, type=int, help="override the patch size of --model")
    g.add_argument(
        "--model_kwargs", default=[], nargs="*", metavar="KEY=VALUE", help="other model overrides, e.g. depth=2"
    )
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of tokens masked, in (0, 1)")
    g.add_argument("--mask_mode", default="independent", choices=models_chamae.MASK_MODES, help="ChannelMAE masking")
    g.add_argument("--hcs", action="store_true", help="hierarchical channel sampling (ChannelMAE)")
    g.add_argument(
        "--bag_of_channels",
        action="store_true",
        help="bag of channels: an mae_* model on one channel drawn at random from each sample (in_chans 1)",
    )
    g.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixels as targets")
    parser.set_defaults(norm_pix_loss=False)
    g.add_argument("--decoder", default="full", choices=["full", "cross"], help="MAE decoder or cross-attention")
    g.add_argument(
        "--decode_ratio", default=1.0, type=float, help="fraction of masked tokens decoded (--decoder cross only)"
    )

    g = parser.add_argument_group("reconstruction images")
    g.add_argument(
        "--vis_every",
        default=10,
        type=int,
        metavar="N",
        help="every N epochs and at the last, rank 0 draws reconstructions of a fixed batch to TensorBoard and "
        "output_dir/vis/epoch_XXX.png (0 = never)",
    )
    g.add_argument("--vis_n", default=8, type=int, help="samples in the reconstruction grid")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--lr", default=None, type=float, metavar="LR", help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument("--blr", default=1e-3, type=float, metavar="LR", help="base lr for an effective batch of 256")
    g.add_argument("--min_lr", default=0.0, type=float, metavar="LR", help="lr floor of the cosine schedule")
    g.add_argument("--warmup_epochs", default=2, type=int, metavar="N")
    g.add_argument("--clip_grad", default=None, type=float, metavar="NORM", help="clip the gradient norm")

    add_common_args(parser)
    parser.add_argument(
        "--channel_vocabulary",
        default=None,
        metavar="A,B,C",
        help="the names of the model's channel-embedding rows, in row order (default: the checkpoint resumed from, "
        "the data-mix file's, else the union of the sources' channel names in order of appearance)",
    )
    add_gpu_augment_arg(parser)
    parser.set_defaults(data_path=os.path.join(REPO_DIR, "sample_data", "ihc"), input_size=64)
    return parser


def check_flags(args):
    """Refuse flags that the run would ignore or only half apply: ``RunError`` before any data are read."""
    if args.decoder == "full" and args.decode_ratio != 1.0:
        raise RunError(
            f"--decode_ratio {args.decode_ratio} needs --decoder cross; the full decoder decodes every masked token"
        )
    if not 0.0 < args.mask_ratio < 1.0:
        hidden = " and --mask_mode channel hides no channel" if args.mask_mode == "channel" else ""
        raise RunError(
            f"--mask_ratio {args.mask_ratio} must be > 0 and < 1: 0 masks no token{hidden}, so nothing is "
            "reconstructed; 1 leaves no token visible"
        )
    channel_flags = [f"--mask_mode {args.mask_mode}"] if args.mask_mode != "independent" else []
    channel_flags += ["--hcs"] if args.hcs else []
    if channel_flags and args.model.startswith("mae_"):
        raise RunError(f"{' and '.join(channel_flags)} need a chamae_* model; {args.model} masks whole patches")
    if args.bag_of_channels and not args.model.startswith("mae_"):
        raise RunError(f"--bag_of_channels trains an mae_* model on single channels; {args.model} is not one")
    if args.bag_of_channels and getattr(args, "gpu_augment", False):
        raise RunError("--bag_of_channels draws channels from CPU-augmented samples; drop --gpu_augment")
    source = "--patch_size" if args.patch_size else f"--model {args.model}"
    args.patch_size = model_patch_size(args.model, args.patch_size, args.model_kwargs)
    check_patch_grid(args.input_size, args.patch_size, source)


def check_channels(args, datasets, sources):
    """``--mask_mode channel`` hides whole channels: with one channel it would silently mask tokens instead. An
    MAE model (one token of all planes) needs one channel set: sources whose channels differ need a ChannelMAE."""
    for dataset, source in zip(datasets, sources):
        if args.mask_mode == "channel" and dataset.in_chans < 2:
            raise RunError(
                f"--mask_mode channel needs at least 2 channels; the data have {dataset.in_chans} ({source.path})"
            )
    if args.bag_of_channels and len(datasets) > 1:
        raise RunError(f"--bag_of_channels draws channels from one source; --data_path gives {len(datasets)}")
    sets = {tuple(d.read_names) for d in datasets}
    if len(sets) > 1 and args.model.startswith("mae_"):
        listed = "; ".join(f"{s.name}: {','.join(d.read_names)}" for s, d in zip(sources, datasets))
        raise RunError(
            f"{args.model} takes one fixed channel set, but the sources' channels differ ({listed}); use "
            f"{args.model.replace('mae_', 'chamae_', 1)}, which takes any channels by name"
        )


def channel_vocabulary(args, datasets, given=None, checkpoint=None) -> list[str]:
    """The channel names of the model's embedding rows, set as each dataset's ``embed_ids``: those of the checkpoint
    resumed from when it names every channel read (so a resumed run maps them by name), else
    ``--channel_vocabulary`` (or the data-mix file's), else the union of the sources' names (a checkpoint that does
    not fit them is then refused when it is loaded). checkpoint: the ``--resume`` file's contents, or None."""
    if checkpoint is not None:
        known = checkpoint_channel_names(checkpoint, args.resume)
        if not is_positional(known) and {n for d in datasets for n in d.read_names} <= set(known):
            return assign_vocabulary(datasets, known, source=args.resume, by_position=False)
    vocabulary = union_vocabulary(datasets, args.channel_vocabulary or given)
    return assign_vocabulary(datasets, vocabulary, source="--channel_vocabulary", by_position=False)


def training_data(args, datasets, sources):
    """The training dataset (one source's, or a ``MixedDataset`` of several), with its description lines."""
    if len(datasets) == 1:
        return datasets[0], describe_dataset("train", datasets[0])
    mixed = MixedDataset(datasets, [s.name for s in sources], [s.weight for s in sources])
    return mixed, f"train: {len(sources)} sources, {len(mixed)} samples\n{mixed.describe()}"


def main(args):
    check_flags(args)
    check_pretrain_resume(args)
    device = setup_run(args)

    datasets, sources, given = build_pretrain_sources(args)
    check_channels(args, datasets, sources)
    checkpoint = load_checkpoint(args.resume, args.unsafe_load) if resolve_resume(args) else None
    vocabulary = channel_vocabulary(args, datasets, given, checkpoint)
    dataset_train, description = training_data(args, datasets, sources)
    print(description)
    print(f"Channel vocabulary ({len(vocabulary)} embedding rows): {','.join(vocabulary)}")
    # saved with the checkpoints, for fine-tuning: normalisation, channel names and per-name statistics
    args.normalization = normalization_record(datasets[0]) if len(datasets) == 1 else names_record(datasets)
    args.vocabulary = vocabulary_record(vocabulary, datasets)
    if args.channels is not None and len(datasets) == 1 and not is_positional(datasets[0].channel_names):
        args.channels = ",".join(datasets[0].read_names)  # by name, for the tools that read the checkpoint
    channel_ids = torch.as_tensor(datasets[0].embed_ids, dtype=torch.long, device=device)
    source = dataset_train
    items = training_items(source, args) if len(datasets) == 1 else source
    if args.bag_of_channels:
        dataset_train = items = SingleChannelDataset(source, items)
        channel_ids = torch.as_tensor(dataset_train.channel_ids, dtype=torch.long, device=device)
    data_loader_train = build_train_loader(items, args)
    if len(datasets) > 1:  # the same on every process (util.loaders.SourceBatchSampler)
        print(f"[rank {get_rank()}] {len(data_loader_train)} batches per epoch", force=True)
    sample_set = dataset_train if args.bag_of_channels else datasets[0]  # what a sample holds (BoC: one channel)
    vis_batch = None
    if args.vis_every > 0 and is_main_process():
        vis_batch = vis.fixed_batch(sample_set, args.vis_n, args.seed).to(device)

    model = build_pretrain_model(args, sample_set.in_chans, len(vocabulary))
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model = {args.model}, {n_parameters / 1e6:.2f}M trainable parameters")

    scale_lr(args)

    optimizer = torch.optim.AdamW(
        pretrain_param_groups(model_without_ddp, args.weight_decay),
        lr=args.lr,
        betas=(0.9, 0.95),
        **adamw_kwargs(device, not args.no_fast_paths),
    )
    loss_scaler = NativeScaler(device, args.amp)
    print(f"AMP: {args.amp}; {describe_optimizer(optimizer)}")

    model, _ = wrap_model(model, args, device)
    state = TrainState(args, model, model_without_ddp, optimizer, loss_scaler, device, channel_ids)
    state.checkpoint = checkpoint

    def visualise(epoch: int):
        """Every --vis_every epochs and at the last: the bare module on rank 0 only (no collective), and the
        training RNG stream is left as it was."""
        if vis_batch is not None and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
            names = vis.channel_labels(sample_set)
            vis.log_reconstructions(model_without_ddp, vis_batch, channel_ids, args, epoch, state.log_writer, names)

    fit(state, data_loader_train, train_one_epoch, dataset=source, after_save=visualise)


if __name__ == "__main__":
    parser = get_args_parser()
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    args = parser.parse_args()
    run_main(main, args, errors=(DatasetError,))
