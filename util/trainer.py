"""The training loop every entry point shares: the steps of one epoch and the epochs of a run.

An engine supplies only its per-batch loss, ``batch_loss(samples, targets, channel_ids) -> loss`` (samples
(N, C, H, W), targets and channel_ids ((C,) or (N, C) channel-embedding rows) already on the device; the engine
applies autocast where it belongs). A batch of a multi-source dataset (``util.data.sources.MixedDataset``) brings its
own channel ids and its source, whose loss is tracked apart (``loss_<source>`` in the meters, log.txt and
TensorBoard). ``train_epoch`` does the rest of a
step: the per-iteration lr (``util.lr_sched``), gradient accumulation (``--accum_iter``, DDP ``no_sync`` between
updates), backward, clipping and the optimizer step through the AMP scaler, loss and gradient-norm tracking on the
device, logging, and the stop-signal check after each optimizer step. ``fit`` runs the epochs in one order:
resume, set the loader's epoch, train, evaluate, save (and keep the best), visualise, log, stop.
"""

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import util.lr_sched as lr_sched
from util.amp import NativeScaler, maybe_no_sync
from util.checkpoint import load_model, save_model, save_stopped
from util.cli import end_training
from util.loaders import set_loader_epoch
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

BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(samples (N, C, H, W), targets (N,), channel ids (C,) / (N, C) / None) on the device -> the scalar loss."""


@dataclass
class TrainState:
    """What a training run carries from step to step and from epoch to epoch.

    ``model`` trains (maybe wrapped in DDP and/or compiled); ``model_without_ddp`` is the bare module whose state is
    saved; ``eval_model`` evaluates (the same weights without DDP). ``channel_ids`` (C,) name the input planes.
    ``progress``: the mid-epoch position of the checkpoint resumed from (``util.preemption.resume_progress``).
    ``max_accuracy``: the best top-1 so far, for runs that evaluate. ``checkpoint``: the ``--resume`` file's
    contents when the entry point has read them already (for its channel vocabulary); ``resume`` loads and drops it.
    """

    args: argparse.Namespace
    model: torch.nn.Module
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_scaler: NativeScaler
    device: torch.device
    channel_ids: torch.Tensor | None = None
    eval_model: torch.nn.Module | None = None
    log_writer: Any = None
    progress: dict | None = None
    max_accuracy: float = 0.0
    checkpoint: dict | None = None

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model_without_ddp.parameters() if p.requires_grad)


def train_epoch(state: TrainState, data_loader, epoch: int, batch_loss: BatchLoss) -> dict:
    """Train for one epoch; returns the epoch averages ``{'lr', 'loss', 'grad_norm'}``.

    The lr follows ``util.lr_sched`` per iteration (updated every ``--accum_iter`` steps). Losses and gradient norms
    (before clipping) stay on the device between logging steps (``util.metric_log.LossTracker``); a NaN/inf loss
    raises ``NonFiniteLossError``. ``state.progress`` (of a checkpoint saved mid-epoch) continues the epoch at its
    step; a stop signal (``util.preemption.install_stop_handlers``) raises ``TrainingStopped`` after an optimizer
    step.
    """
    args, model, optimizer = state.args, state.model, state.optimizer
    model.train(True)
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    start_step = restore_meters(metric_logger, state.progress)
    num_steps = start_step + len(data_loader)
    tracker = LossTracker(state.device, epoch, getattr(data_loader.dataset, "source_names", None))
    lr = optimizer.param_groups[0]["lr"]
    device_augment = getattr(data_loader.dataset, "device_augment", None)  # --gpu_augment (util.data.device_augment)

    optimizer.zero_grad(set_to_none=True)
    batches = metric_logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]")
    for step, batch in enumerate(batches, start_step):
        if step % args.accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        samples, targets, channel_ids, source = unpack_batch(batch, state)
        samples = device_augment(samples) if device_augment is not None else samples
        update = (step + 1) % args.accum_iter == 0
        with maybe_no_sync(model, not update):
            loss = batch_loss(samples, targets, channel_ids)
            grad_norm = state.loss_scaler(
                loss / args.accum_iter,
                optimizer,
                clip_grad=args.clip_grad,
                parameters=model.parameters(),
                update_grad=update,
            )
        if update:
            optimizer.zero_grad(set_to_none=True)
        tracker.update(loss, step, grad_norm, source)

        log_train_step(step, num_steps, epoch, lr, tracker, metric_logger, state.log_writer, args.print_freq)
        if update and step + 1 < num_steps:  # a stop at the last step is handled once the epoch is saved
            stop_if_requested(epoch, step, tracker, metric_logger, data_loader.batch_sampler.batch_size)

    print("Averaged stats:", metric_logger)
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


def unpack_batch(batch, state: TrainState):
    """(samples, targets, channel ids, source index or None) of a batch on the device: (imgs, labels) take
    ``state.channel_ids``; a multi-source batch (imgs, labels, ids (N, C), sources (N,)) brings its own."""
    samples = batch[0].to(state.device, non_blocking=True)
    targets = batch[1].to(state.device, non_blocking=True)
    if len(batch) == 2:
        return samples, targets, state.channel_ids, None
    return samples, targets, batch[2].to(state.device, non_blocking=True), int(batch[3][0])


def resume(state: TrainState) -> dict | None:
    """Load ``--resume`` / ``--auto_resume`` into the state (weights, optimizer, scaler, epoch, RNG, mid-epoch
    position, best accuracy); call after everything that draws random numbers at start-up. Returns the checkpoint."""
    args = state.args
    checkpoint = load_model(args, state.model_without_ddp, state.optimizer, state.loss_scaler, state.checkpoint)
    state.checkpoint = None
    if checkpoint and not getattr(args, "eval", False):
        state.max_accuracy = checkpoint.get("max_accuracy", 0.0)
    state.progress = resume_progress(checkpoint, args)
    return checkpoint


def fit(
    state: TrainState,
    data_loader,
    train_one_epoch: Callable[[TrainState, Any, int], dict],
    dataset=None,
    evaluate: Callable[[], dict] | None = None,
    after_save: Callable[[int], None] | None = None,
) -> dict:
    """Resume, then train ``args.start_epoch .. args.epochs - 1``, checkpointing every epoch; returns the last test
    stats ({} without ``evaluate``).

    Per epoch: seed the loader, ``train_one_epoch(state, data_loader, epoch)`` (a stop signal saves a mid-epoch
    checkpoint and re-raises), ``evaluate()`` (its 'acc1' keeps ``checkpoint-best.pth`` and ``max_accuracy``),
    save, ``after_save(epoch)`` (e.g. reconstruction images), TensorBoard and ``log.txt`` (with
    ``dataset``'s skipped-sample counts), then stop if a signal came meanwhile.
    """
    args = state.args
    resume(state)
    state.log_writer = open_log_writer(args)
    install_stop_handlers()
    print(f"Start training for {args.epochs} epochs")
    test_stats = {}
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        set_loader_epoch(data_loader, epoch, args, state.progress)
        try:
            train_stats = train_one_epoch(state, data_loader, epoch)
        except TrainingStopped as stop:  # SIGTERM / SIGUSR1: save mid-epoch, then exit (util.cli.run_main)
            extra = {"max_accuracy": state.max_accuracy} if evaluate is not None else None
            save_stopped(
                stop, args, epoch, state.model_without_ddp, state.optimizer, state.loss_scaler, state.log_writer, extra
            )
            raise
        state.progress = None
        extra, improved = None, False
        if evaluate is not None:
            test_stats = evaluate()
            improved = test_stats["acc1"] > state.max_accuracy
            state.max_accuracy = max(state.max_accuracy, test_stats["acc1"])
            print(f"Max accuracy: {state.max_accuracy:.2f}%")
            extra = {"max_accuracy": state.max_accuracy, "test_acc1": test_stats["acc1"]}
        path = save_model(args, epoch, state.model_without_ddp, state.optimizer, state.loss_scaler, extra)
        if improved:
            save_model(args, epoch, state.model_without_ddp, state.optimizer, state.loss_scaler, extra, tag="best")
        if after_save is not None:
            after_save(epoch)
        log_epoch(state, epoch, train_stats, test_stats, dataset)
        stop_after_epoch(args, epoch, path)

    end_training(start_time, state.log_writer)
    return test_stats


def log_epoch(state: TrainState, epoch: int, train_stats: dict, test_stats: dict, dataset=None):
    """The test scalars to TensorBoard and one ``log.txt`` line for ``epoch``. TensorBoard's x axis is 1000 x the
    epochs done for every scalar (``util.metric_log.log_train_step``), so the test scalars of ``epoch`` sit at
    1000 x (epoch + 1), where its last training scalars are."""
    if state.log_writer is not None:
        for key in ("acc1", "acc5", "loss"):
            if key in test_stats:
                state.log_writer.add_scalar(f"test_{key}", test_stats[key], (epoch + 1) * 1000)
    log_stats = {
        **{f"train_{k}": v for k, v in train_stats.items()},
        **{f"test_{k}": v for k, v in test_stats.items()},
        "epoch": epoch,
        "n_parameters": state.n_parameters,
        **skip_stats(dataset),
    }
    write_log(args=state.args, stats=log_stats, log_writer=state.log_writer)
