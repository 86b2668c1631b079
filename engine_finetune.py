"""Supervised fine-tuning / linear probing: the data, one epoch, evaluation (top-1/top-5 accuracy, loss) and the
training loop shared by main_finetune and main_linprobe."""

import json

import torch

from util.amp import autocast
from util.cli import describe_dataset
from util.data.builders import build_dataset
from util.data.device_augment import training_items
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


def channel_vocabulary(args, datasets, vocabulary=None, resumed=False) -> list[str]:
    """The channel names of the classifier's embedding rows, set as each dataset's ``embed_ids``: the checkpoint's
    ``vocabulary`` (grown by ``--new_channels`` when fine-tuning from it), else the data's channel names.

    A ViT takes its planes in one fixed order: with a checkpoint that names its channels, the data must read them in
    that order (``check_fixed_order``); positional checkpoints (published MAE files) take the planes as they come.
    """
    source = args.resume if resumed else args.finetune
    if args.model.startswith("vit_"):
        if args.new_channels:
            raise RunError(f"--new_channels needs a channelvit_* model; {args.model} has no channel embedding")
        check_fixed_order(datasets[0], vocabulary, args.model, source)
        return datasets[0].read_names
    if vocabulary is None:
        return assign_vocabulary(datasets, union_vocabulary(datasets[:1]), by_position=False)
    new_channels = [] if resumed else parse_new_channels(args.new_channels)
    return assign_vocabulary(datasets, vocabulary, new_channels, source)


def build_data(args, device, checkpoint_stats: dict | None = None, vocabulary=None, resumed: bool = False):
    """(train dataset, train loader (None under --eval), val loader, channel ids (C,): the embedding rows of the
    channels read); sets ``args.nb_classes`` when not given (``RunError`` when it is given and below the number of
    classes), ``args.normalization`` and ``args.vocabulary`` (saved with the checkpoints). checkpoint_stats: the
    checkpoint's recorded normalisation; vocabulary, resumed: its channel names and whether it is resumed
    (``channel_vocabulary``)."""
    dataset_train = build_dataset(True, args, checkpoint_stats)
    dataset_val = build_dataset(False, args, checkpoint_stats)
    names = channel_vocabulary(args, [dataset_train, dataset_val], vocabulary, resumed)
    print(describe_dataset("train", dataset_train))
    print(describe_dataset("val", dataset_val))
    print(f"Channel vocabulary ({len(names)} embedding rows): {','.join(names)}")
    args.normalization = normalization_record(dataset_train)
    args.vocabulary = vocabulary_record(names, [dataset_train])
    if args.channels is not None and not is_positional(dataset_train.channel_names):
        args.channels = ",".join(dataset_train.read_names)  # by name, for a later --resume / --eval
    if args.nb_classes is None:
        args.nb_classes = dataset_train.nb_classes
    elif args.nb_classes < dataset_train.nb_classes:
        raise RunError(
            f"--nb_classes {args.nb_classes} is below the {dataset_train.nb_classes} classes of the train split of "
            f"{args.data_path}: their labels would index no output; leave --nb_classes out to take "
            f"{dataset_train.nb_classes}"
        )
    channel_ids = torch.as_tensor(dataset_train.embed_ids, dtype=torch.long, device=device)
    loader_train = None if args.eval else build_train_loader(training_items(dataset_train, args), args)
    loader_val = build_eval_loader(dataset_val, args)
    return dataset_train, loader_train, loader_val, channel_ids


def fit(state: TrainState, data, criterion: torch.nn.Module, mixup_fn=None) -> dict:
    """Resume if asked, then evaluate once (``--eval``) or train (``util.trainer.fit``), evaluating and
    checkpointing every epoch and keeping ``checkpoint-best.pth`` for the best top-1 accuracy.

    ``data`` is ``build_data``'s result. Returns the last test stats.
    """
    args = state.args
    dataset_train, data_loader_train, data_loader_val, _ = data

    def evaluate_val() -> dict:
        test_stats = evaluate(data_loader_val, state.eval_model, state.device, args, state.channel_ids)
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
