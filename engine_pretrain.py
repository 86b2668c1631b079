"""One epoch of masked-autoencoder pretraining (MAE and ChannelMAE)."""

import torch

import util.lr_sched as lr_sched
from util.amp import NativeScaler, autocast, maybe_no_sync
from util.metric_log import LossTracker, MetricLogger, SmoothedValue, log_train_step
from util.preemption import restore_meters, stop_if_requested


def train_one_epoch(
    model: torch.nn.Module,
    data_loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler: NativeScaler,
    log_writer=None,
    args=None,
    channel_ids: torch.Tensor | None = None,
    progress: dict | None = None,
) -> dict:
    """Train for one epoch; returns the epoch averages ``{'loss': ..., 'lr': ..., 'grad_norm': ...}``.

    Batches are (imgs (N, C, H, W), labels); labels are ignored. ``channel_ids`` (C,) names the input planes. The
    lr follows ``util.lr_sched`` per iteration (updated every ``args.accum_iter`` steps). Losses and gradient norms
    (before clipping) stay on the device between logging steps (see ``LossTracker``); a NaN/inf loss raises
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
    for step, (samples, _) in enumerate(metric_logger.log_every(data_loader, print_freq, header), start_step):
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        samples = samples.to(device, non_blocking=True)
        update = (step + 1) % accum_iter == 0
        with maybe_no_sync(model, not update):
            with autocast(device, args.amp):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio, channel_ids=channel_ids)
            grad_norm = loss_scaler(
                loss / accum_iter,
                optimizer,
                clip_grad=args.clip_grad,
                parameters=model.parameters(),
                update_grad=update,
            )
        if update:
            optimizer.zero_grad(set_to_none=True)
        tracker.update(loss, step, grad_norm)

        log_train_step(step, num_steps, epoch, lr, tracker, metric_logger, log_writer, print_freq)
        if update and step + 1 < num_steps:  # a stop at the last step is handled once the epoch is saved
            stop_if_requested(epoch, step, tracker, metric_logger, data_loader.batch_size)

    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    print("Averaged stats:", metric_logger)
    return stats
