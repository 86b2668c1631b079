"""Per-iteration learning-rate schedule: linear warmup followed by a half-cycle cosine decay."""

import math


def lr_at(epoch: float, args) -> float:
    """Learning rate at a fractional epoch (``epoch = epoch_index + step / steps_per_epoch``).

    Linear warmup from 0 to ``args.lr`` over ``args.warmup_epochs`` epochs, then a cosine decay from
    ``args.lr`` to ``args.min_lr`` at ``args.epochs``.
    """
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    decay_epochs = max(args.epochs - args.warmup_epochs, 1e-8)
    progress = min((epoch - args.warmup_epochs) / decay_epochs, 1.0)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set every param group's lr for the fractional ``epoch`` and return the base (unscaled) lr.

    A group's lr is the base lr times its ``'lr_scale'`` (layer-wise decay), 1.0 when the key is absent.
    """
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
