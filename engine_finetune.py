"""Supervised fine-tuning / linear probing: the data, one epoch, evaluation (top-1/top-5 accuracy, loss) and the
training loop shared by main_finetune and main_linprobe."""

import json

import torch

from util.amp import autocast
from util.cli import describe_dataset
from util.data.device_augment import training_items
from util.data.sources import MixedDataset, build_labelled_sources, names_record
from util.data.stats import normalization_record
from util.data.vocabulary import (
    assign_vocabulary,
    check_fixed_order,
    is_positional,
    parse_new_channels,
    union_vocabulary,
    vocabulary_record,
)
from util.distributed import cleanup_distributed, is_dist_avail_and_initialized, reduction_device
from util.errors import RunError
from util.loaders import build_eval_loader, build_train_loader
from util.metric_log import MetricLogger
from util.trainer import TrainState, resume, train_epoch
from util.trainer import fit as trainer_fit


def train_one_epoch(state: TrainState, data_loader, epoch: int, criterion: torch.nn.Module, mixup_fn=None) -> dict:
    """Train for one epoch (``util.trainer.train_epoch``); returns the epoch averages ``{'lr', 'loss', 'grad_norm'}``.

    Batches are (imgs (N, C, H, W), labels (N,)); ``mixup_fn`` turns labels into soft targets (N, num_classes).
    ``state.channel_ids`` (C,) are the embedding rows of the input planes (``util.trainer.unpack_batch``). The
    criterion runs on float32 logits, outside autocast.
    """
    args = state.args

    def batch_loss(samples, targets, channel_ids):
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with autocast(state.device, args.amp):
            outputs = state.model(samples, channel_ids=channel_ids)
        return criterion(outputs.float(), targets)  # softmax and means in float32 whatever the autocast dtype

    return train_epoch(state, data_loader, epoch, batch_loss)


@torch.no_grad()
def evaluate(data_loader, model, device, args=None, channel_ids=None) -> dict:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy in percent and mean cross-entropy.

    Sums stay on the device until the end; with ``--dist_eval`` each process scores its own shard and the sums
    are all-reduced, so every sample counts exactly once. Returns ``{'acc1', ['acc5',] 'loss', 'n'}``.
    """
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    metric_logger = MetricLogger(delimiter="  ")
    amp = args.amp if args is not None else "none"
    print_freq = args.print_freq if args is not None else 20
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct@1, correct@5
    count = 0
    num_classes = None
    for batch in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = batch[0].to(device, non_blocking=True)
        targets = batch[1].to(device, non_blocking=True)
        ids = batch[2].to(device, non_blocking=True) if len(batch) > 2 else channel_ids  # multi-source batches
        with autocast(device, amp):
            output = model(images, channel_ids=ids)
        output = output.float()
        num_classes = output.shape[1]
        hits = output.topk(min(5, num_classes), dim=1).indices == targets[:, None]
        sums += torch.stack([criterion(output, targets), hits[:, 0].sum(), hits.any(dim=1).sum()]).double()
        count += len(targets)
    totals = torch.cat([sums.cpu(), torch.tensor([float(count)], dtype=torch.float64)])
    if getattr(args, "dist_eval", False) and is_dist_avail_and_initialized():
        totals = totals.to(reduction_device())
        torch.distributed.all_reduce(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    count = max(count, 1.0)
    stats = {"acc1": 100.0 * correct1 / count, "loss": loss_sum / count, "n": int(count)}
    if num_classes is not None and num_classes >= 5:
        stats["acc5"] = 100.0 * correct5 / count
    top5 = f" Acc@5 {stats['acc5']:.3f}" if "acc5" in stats else ""
    print(f"* Acc@1 {stats['acc1']:.3f}{top5} loss {stats['loss']:.3f}")
    return stats


def log_eval(test_stats: dict):
    print(f"Accuracy of the network on the {test_stats['n']} test images: {test_stats['acc1']:.2f}%")


def check_channel_sets(args, datasets, sources):
    """A vit_* model takes one fixed channel set: sources whose channels differ need a channelvit_* model."""
    if args.model.startswith("vit_") and len({tuple(d.read_names) for d in datasets}) > 1:
        listed = "; ".join(f"{s.name}: {','.join(d.read_names)}" for s, d in zip(sources, datasets))
        raise RunError(
            f"{args.model} takes one fixed channel set, but the sources' channels differ ({listed}); use a "
            f"channelvit_* model (e.g. {args.model.replace('vit_', 'channelvit_', 1)})"
        )


def channel_vocabulary(args, train, val, vocabulary=None, resumed=False, given=None) -> list[str]:
    """The channel names of the classifier's embedding rows, set as each dataset's ``embed_ids``: the checkpoint's
    ``vocabulary`` (grown by ``--new_channels`` when fine-tuning from it), else ``given`` (a data-mix file's) or the
    union of the train datasets' channel names.

    A ViT takes its planes in one fixed order: with a checkpoint that names its channels, the data must read them in
    that order (``check_fixed_order``); positional checkpoints (published MAE files) take the planes as they come.
    """
    source = args.resume if resumed else args.finetune
    if args.model.startswith("vit_"):
        if args.new_channels:
            raise RunError(f"--new_channels needs a channelvit_* model; {args.model} has no channel embedding")
        check_fixed_order(train[0], vocabulary, args.model, source)
        return train[0].read_names
    if vocabulary is None:
        return assign_vocabulary(train + val, union_vocabulary(train, given), by_position=False)
    new_channels = [] if resumed else parse_new_channels(args.new_channels)
    return assign_vocabulary(train + val, vocabulary, new_channels, source)


def set_nb_classes(args, dataset_train):
    """``args.nb_classes`` from the data when not given; ``RunError`` when it is below the number of classes."""
    if args.nb_classes is None:
        args.nb_classes = dataset_train.nb_classes
    elif args.nb_classes < dataset_train.nb_classes:
        raise RunError(
            f"--nb_classes {args.nb_classes} is below the {dataset_train.nb_classes} classes of the train split of "
            f"{args.data_path}: their labels would index no output; leave --nb_classes out to take "
            f"{dataset_train.nb_classes}"
        )


def build_data(args, device, checkpoint_stats: dict | None = None, vocabulary=None, resumed: bool = False):
    """(train dataset, train loader (None under --eval), val loaders {source name: (loader, channel ids (C_s,))},
    channel ids (C,): the embedding rows of the first source's channels).

    Several ``--data_path`` roots train on a ``MixedDataset`` (one source per batch, ``SourceBatchSampler``) with
    labels indexing the sorted union of their class names. Sets ``args.nb_classes`` when not given,
    ``args.normalization`` and ``args.vocabulary`` (saved with the checkpoints). checkpoint_stats: the
    checkpoint's recorded normalisation; vocabulary, resumed: its channel names and whether it is resumed.
    """
    train, val, sources, given = build_labelled_sources(args, checkpoint_stats)
    check_channel_sets(args, train, sources)
    names = channel_vocabulary(args, train, val, vocabulary, resumed, given)
    if len(train) == 1:
        dataset_train = train[0]
        print(describe_dataset("train", dataset_train))
        print(describe_dataset("val", val[0]))
        args.normalization = normalization_record(dataset_train)
    else:
        dataset_train = MixedDataset(train, [s.name for s in sources], [s.weight for s in sources])
        print(f"train: {len(sources)} sources, {len(dataset_train)} samples, {dataset_train.nb_classes} classes")
        print(dataset_train.describe())
        print(f"val: {', '.join(f'{s.name} {len(d)}' for s, d in zip(sources, val))} samples")
        args.normalization = {
            **names_record(train),
            "sources": {s.name: normalization_record(d) for s, d in zip(sources, train)},
        }
    print(f"Channel vocabulary ({len(names)} embedding rows): {','.join(names)}")
    args.vocabulary = vocabulary_record(names, train)
    if args.channels is not None and len(train) == 1 and not is_positional(train[0].channel_names):
        args.channels = ",".join(train[0].read_names)  # by name, for a later --resume / --eval
    set_nb_classes(args, dataset_train)
    channel_ids = torch.as_tensor(train[0].embed_ids, dtype=torch.long, device=device)
    items = training_items(dataset_train, args) if len(train) == 1 else dataset_train
    loader_train = None if args.eval else build_train_loader(items, args)
    loaders_val = {
        s.name: (build_eval_loader(d, args), torch.as_tensor(d.embed_ids, dtype=torch.long, device=device))
        for s, d in zip(sources, val)
    }
    return dataset_train, loader_train, loaders_val, channel_ids


def evaluate_sources(loaders: dict, model, device, args) -> dict:
    """``evaluate`` over every source's val split; with several sources, the overall stats (every sample counts
    once) plus ``acc1_<source>`` and ``loss_<source>``."""
    per_source = {name: evaluate(loader, model, device, args, ids) for name, (loader, ids) in loaders.items()}
    if len(per_source) == 1:
        return next(iter(per_source.values()))
    n = sum(s["n"] for s in per_source.values())
    stats = {
        k: sum(s[k] * s["n"] for s in per_source.values()) / n
        for k in ("acc1", "acc5", "loss")
        if all(k in s for s in per_source.values())
    }
    stats["n"] = n
    for name, s in per_source.items():
        stats[f"acc1_{name}"] = s["acc1"]
        stats[f"loss_{name}"] = s["loss"]
    return stats


def fit(state: TrainState, data, criterion: torch.nn.Module, mixup_fn=None) -> dict:
    """Resume if asked, then evaluate once (``--eval``) or train (``util.trainer.fit``), evaluating and
    checkpointing every epoch and keeping ``checkpoint-best.pth`` for the best top-1 accuracy.

    ``data`` is ``build_data``'s result. Returns the last test stats.
    """
    args = state.args
    dataset_train, data_loader_train, loaders_val, _ = data

    def evaluate_val() -> dict:
        test_stats = evaluate_sources(loaders_val, state.eval_model, state.device, args)
        log_eval(test_stats)
        return test_stats

    if args.eval:
        resume(state)
        test_stats = evaluate_val()
        print(json.dumps({f"test_{k}": v for k, v in test_stats.items()}))
        cleanup_distributed()
        return test_stats

    def train(state, data_loader, epoch):
        return train_one_epoch(state, data_loader, epoch, criterion, mixup_fn)

    return trainer_fit(state, data_loader_train, train, dataset=dataset_train, evaluate=evaluate_val)
