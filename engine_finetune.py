"""One epoch of supervised fine-tuning / linear probing, and evaluation (top-1/top-5 accuracy, loss)."""

import torch

import util.lr_sched as lr_sched
import util.misc as misc


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    data_loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler: misc.NativeScaler,
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
    (before clipping) stay on the device between logging steps (``misc.LossTracker``); a NaN/inf loss raises
    ``misc.NonFiniteLossError``.
    ``progress`` (of a checkpoint saved mid-epoch, ``misc.resume_progress``) continues the epoch at its step; a
    stop signal (``misc.install_stop_handlers``) raises ``misc.TrainingStopped`` after an optimizer step.
    """
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    print_freq = args.print_freq
    accum_iter = args.accum_iter
    start_step = misc.restore_meters(metric_logger, progress)
    num_steps = start_step + len(data_loader)
    tracker = misc.LossTracker(device, epoch)
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
        with misc.maybe_no_sync(model, not update):
            with misc.autocast(device, args.amp):
                outputs = model(samples, channel_ids=channel_ids)
            loss = criterion(outputs.float(), targets)  # softmax and means in float32 whatever the autocast dtype
            grad_norm = loss_scaler(
                loss / accum_iter, optimizer, clip_grad=max_norm, parameters=model.parameters(), update_grad=update
            )
        if update:
            optimizer.zero_grad(set_to_none=True)
        tracker.update(loss, step, grad_norm)

        misc.log_train_step(step, num_steps, epoch, lr, tracker, metric_logger, log_writer, print_freq)
        if update and step + 1 < num_steps:  # a stop at the last step is handled once the epoch is saved
            misc.stop_if_requested(epoch, step, tracker, metric_logger, data_loader.batch_size)

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
    metric_logger = misc.MetricLogger(delimiter="  ")
    amp = args.amp if args is not None else "none"
    print_freq = args.print_freq if args is not None else 20
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct@1, correct@5
    count = 0
    num_classes = None
    for images, targets in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with misc.autocast(device, amp):
            output = model(images, channel_ids=channel_ids)
        output = output.float()
        num_classes = output.shape[1]
        hits = output.topk(min(5, num_classes), dim=1).indices == targets[:, None]
        sums += torch.stack([criterion(output, targets), hits[:, 0].sum(), hits.any(dim=1).sum()]).double()
        count += len(targets)
    totals = torch.cat([sums.cpu(), torch.tensor([float(count)], dtype=torch.float64)])
    if getattr(args, "dist_eval", False) and misc.is_dist_avail_and_initialized():
        totals = totals.to(misc.reduction_device())
        torch.distributed.all_reduce(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    count = max(count, 1.0)
    stats = {"acc1": 100.0 * correct1 / count, "loss": loss_sum / count, "n": int(count)}
    if num_classes is not None and num_classes >= 5:
        stats["acc5"] = 100.0 * correct5 / count
    top5 = f" Acc@5 {stats['acc5']:.3f}" if "acc5" in stats else ""
    print(f"* Acc@1 {stats['acc1']:.3f}{top5} loss {stats['loss']:.3f}")
    return stats
