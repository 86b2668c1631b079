"""Masked-autoencoder pretraining (MAE and ChannelMAE): the per-batch loss of one epoch."""

from util.amp import autocast
from util.trainer import TrainState, train_epoch


def train_one_epoch(state: TrainState, data_loader, epoch: int) -> dict:
    """Train for one epoch (``util.trainer.train_epoch``); returns the epoch averages ``{'lr', 'loss', 'grad_norm'}``.

    Batches are (imgs (N, C, H, W), labels), labels ignored, with ``state.channel_ids`` (C,) the embedding rows of
    the input planes, or multi-source batches that bring their own (N, C) rows (``util.trainer.unpack_batch``); the
    loss is the model's masked reconstruction error at ``--mask_ratio``.
    """
    args = state.args

    def batch_loss(samples, _, channel_ids):
        with autocast(state.device, args.amp):
            loss, _, _ = state.model(samples, mask_ratio=args.mask_ratio, channel_ids=channel_ids)
        return loss

    return train_epoch(state, data_loader, epoch, batch_loss)
