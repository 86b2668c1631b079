"""Optimiser helpers: pretraining param groups and the learning rate from the base lr and the effective batch size."""

import timm.optim
import torch

from util.distributed import get_world_size


def pretrain_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups by the official MAE rule: no weight decay for 1-D parameters and biases, decay for every
    other trainable parameter, cls_token, mask_token and the channel embeddings included (frozen sin-cos
    position embeddings are left out)."""
    return timm.optim.param_groups_weight_decay(model, weight_decay)


def scale_lr(args) -> int:
    """Set ``args.lr = args.blr * eff_batch / 256`` unless ``--lr`` was given; return the effective batch size."""
    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}, actual lr: {args.lr:.2e}")
    print(f"accumulate grad iterations: {args.accum_iter}, effective batch size: {eff_batch_size}")
    return eff_batch_size
