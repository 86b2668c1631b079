"""Supervised fine-tuning / linear probing: the data, one epoch, evaluation (top-1/top-5 accuracy, loss) and the
training loop shared by main_finetune and main_linprobe."""

import json
import time

import torch

import util.lr_sched as lr_sched
from util.amp import NativeScaler, autocast, maybe_no_sync
from util.checkpoint import load_model, save_model, save_stopped
from util.cli import describe_dataset, end_training
from util.data.builders import build_dataset
from util.data.stats import normalization_record
from util.distributed import cleanup_distributed, is_dist_avail_and_initialized, reduction_device
from util.loaders import build_eval_loader, build_train_loader, set_loader_epoch
from util.metric_log import (
    LossTracker,
    MetricLogger,
    SmoothedValue,
    log_train_step,
    open_log_writer,
    skip_stats,
    write_log,
)
from util.preemption import (
    TrainingStopped,
    install_stop_handlers,
    restore_meters,
    resume_progress,
    stop_after_epoch,
    stop_if_requested,
)


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    data_loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler: NativeScaler,
    max_norm: float | None = None,
    mixup_fn=None,
    log_writer=None,
    args=None,
    channel_ids: torch.Tensor | None = None,
    progress: dict | None = None,
) -> dict:
    """Train for one epoch; returns the epoch averages ``{'loss': ..., 'lr': ..., 'grad_norm': ...}``.

    Batches are (imgs (N, C, H, W), labels (N,)); ``mixup_fn`` turns labels into soft targets (N, num_classes).
    ``channel_ids`` (C,) names the input planes. The criterion runs on float32 logits. Losses and gradient norms
    (before clipping) stay on the device between logging steps (``LossTracker``); a NaN/inf loss raises
    ``NonFiniteLossError``.
    ``progress`` (of a checkpoint saved mid-epoch, ``resume_progress``) continues the epoch at its step; a
    stop signal (``install_stop_handlers``) raises ``TrainingStopped`` after an optimizer step.
    """
    model.train(True)
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    print_freq = args.print_freq
    accum_iter = args.accum_iter
    start_step = restore_meters(metric_logger, progress)
    num_steps = start_step + len(data_loader)
    tracker = LossTracker(device, epoch)
    lr = optimizer.param_groups[0]["lr"]

    optimizer.zero_grad(set_to_none=True)
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header), start_step):
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (step + 1) % accum_iter == 0
        with maybe_no_sync(model, not update):
            with autocast(device, args.amp):
                outputs = model(samples, channel_ids=channel_ids)
            loss = criterion(outputs.float(), targets)  # softmax and means in float32 whatever the autocast dtype
            grad_norm = loss_scaler(
                loss / accum_iter, optimizer, clip_grad=max_norm, parameters=model.parameters(), update_grad=update
            )
        if update:
            optimizer.zero_grad(set_to_none=True)
        tracker.update(loss, step, grad_norm)

        log_train_step(step, num_steps, epoch, lr, tracker, metric_logger, log_writer, print_freq)
        if update and step + 1 < num_steps:  # a stop at the last step is handled once the epoch is saved
            stop_if_requested(epoch, step, tracker, metric_logger, data_loader.batch_size)

    print("Averaged stats:", metric_logger)
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


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
    for images, targets in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(images, channel_ids=channel_ids)
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


def build_data(args, device, checkpoint_stats: dict | None = None):
    """(train dataset, train loader (None under --eval), val loader, channel ids (C,)); sets ``args.nb_classes``
    when not given and ``args.normalization`` (saved with the checkpoints). checkpoint_stats: the checkpoint's
    recorded normalisation."""
    dataset_train = build_dataset(True, args, checkpoint_stats)
    dataset_val = build_dataset(False, args, checkpoint_stats)
    print(describe_dataset("train", dataset_train))
    print(describe_dataset("val", dataset_val))
    args.normalization = normalization_record(dataset_train)
    if args.nb_classes is None:
        args.nb_classes = dataset_train.nb_classes
    channel_ids = torch.as_tensor(dataset_train.channel_ids, dtype=torch.long, device=device)
    loader_train = None if args.eval else build_train_loader(dataset_train, args)
    loader_val = build_eval_loader(dataset_val, args)
    return dataset_train, loader_train, loader_val, channel_ids


def fit(args, model, model_without_ddp, eval_model, criterion, optimizer, loss_scaler, data, device, mixup_fn=None):
    """Resume if asked, then evaluate once (``--eval``) or train, evaluating and checkpointing every epoch.

    ``model`` is the training module (maybe DDP / compiled), ``eval_model`` the same weights without DDP;
    ``data`` is ``build_data``'s result. Keeps ``checkpoint-best.pth`` for the best top-1 accuracy. Returns the
    last test stats.
    """
    _, data_loader_train, data_loader_val, channel_ids = data
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    checkpoint = load_model(args, model_without_ddp, optimizer, loss_scaler)
    max_accuracy = checkpoint.get("max_accuracy", 0.0) if checkpoint and not args.eval else 0.0
    progress = resume_progress(checkpoint, args)

    if args.eval:
        test_stats = evaluate(data_loader_val, eval_model, device, args, channel_ids)
        log_eval(test_stats)
        print(json.dumps({f"test_{k}": v for k, v in test_stats.items()}))
        cleanup_distributed()
        return test_stats

    log_writer = open_log_writer(args)
    install_stop_handlers()
    print(f"Start training for {args.epochs} epochs")
    test_stats = {}
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        set_loader_epoch(data_loader_train, epoch, args, progress)
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
        except TrainingStopped as stop:  # SIGTERM / SIGUSR1: save mid-epoch, then exit (run_main)
            extra = {"max_accuracy": max_accuracy}
            save_stopped(stop, args, epoch, model_without_ddp, optimizer, loss_scaler, log_writer, extra)
            raise
        progress = None
        test_stats = evaluate(data_loader_val, eval_model, device, args, channel_ids)
        log_eval(test_stats)
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f"Max accuracy: {max_accuracy:.2f}%")
        extra = {"max_accuracy": max_accuracy, "test_acc1": test_stats["acc1"]}
        path = save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra)
        if improved:
            save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra, tag="best")

        if log_writer is not None:
            for key in ("acc1", "acc5", "loss"):
                if key in test_stats:
                    log_writer.add_scalar(f"test_{key}", test_stats[key], epoch)
        log_stats = {
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in test_stats.items()},
            "epoch": epoch,
            "n_parameters": n_parameters,
            **skip_stats(data[0]),
        }
        write_log(args, log_stats, log_writer)
        stop_after_epoch(args, epoch, path)

    end_training(start_time, log_writer)
    return test_stats
