"""Embeddings of channel subsets and channel by channel (bag of channels), and the encoders they come from.

Shared by ``extract_features.py`` (``--bag_of_channels``, ``--raw_pixels``) and ``evaluate_features.py``'s
channel-robustness protocol, which re-encodes the data with channels left out:

- channel models (ChannelViT / ChannelMAE) are given only the kept channels and their ids;
- whole-patch models (ViT / MAE) need every input plane: the missing ones are zero-filled, i.e. set to the
  channel's normalisation mean, as in the ChannelViT paper;
- a bag-of-channels embedding encodes each channel on its own and concatenates the per-channel embeddings in
  vocabulary order (slot = channel id), the slots of missing channels left zero.
"""

import torch
import torch.nn.functional as F

from models_checkpoint import model_from_checkpoint
from util.checkpoint import read_checkpoint
from util.data.evaluation import eval_dataset, inherit_data_args
from util.features import encode, is_channel_model


def input_planes(model) -> int:
    """Input planes the patch embedding takes: 1 for channel models and single-channel (BoC) encoders."""
    return model.patch_embed.proj.weight.shape[1]


def encode_subset(model, imgs, channel_ids, keep, pool: str) -> torch.Tensor:
    """imgs (N, C, H, W), channel_ids (C,), keep: positions kept -> pooled embedding (N, D).

    Channel models see imgs[:, keep] with channel_ids[keep]; other models see imgs with the rest zeroed.
    """
    keep = torch.as_tensor(list(keep), dtype=torch.long, device=imgs.device)
    if is_channel_model(model):
        return encode(model, imgs[:, keep], channel_ids[keep], pool)[0]
    zeroed = torch.zeros_like(imgs)
    zeroed[:, keep] = imgs[:, keep]
    return encode(model, zeroed, channel_ids, pool)[0]


def encode_one_channel(model, imgs, channel_ids, c: int, pool: str) -> torch.Tensor:
    """The embedding (N, D) of channel position c of imgs (N, C, H, W) encoded on its own."""
    if is_channel_model(model):
        return encode(model, imgs[:, c : c + 1], channel_ids[c : c + 1], pool)[0]
    if input_planes(model) == 1:
        return encode(model, imgs[:, c : c + 1], channel_ids[c : c + 1], pool)[0]
    return encode_subset(model, imgs, channel_ids, [c], pool)


def bag_of_channels(model, imgs, channel_ids, vocabulary: int, pool: str, keep=None) -> torch.Tensor:
    """imgs (N, C, H, W) -> (N, vocabulary * D): channel id v's embedding in slot v, zeros where absent.

    keep: the positions given (default all); the others are treated as missing.
    """
    N, C = imgs.shape[:2]
    D = model.cls_token.shape[-1]
    out = imgs.new_zeros(N, vocabulary, D)
    for c in range(C) if keep is None else keep:
        out[:, int(channel_ids[c])] = encode_one_channel(model, imgs, channel_ids, c, pool).to(out.dtype)
    return out.reshape(N, vocabulary * D)


def raw_pixels(imgs: torch.Tensor, size: int, keep=None) -> torch.Tensor:
    """imgs (N, C, H, W) normalised -> (N, C * size * size): resized (bilinear, antialiased), flattened; the
    channels not in keep are zero."""
    x = F.interpolate(imgs, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if keep is not None:
        mask = torch.zeros(imgs.shape[1], dtype=torch.bool, device=imgs.device)
        mask[list(keep)] = True
        x = x * mask[None, :, None, None]
    return x.flatten(1)


def head_of(path: str, unsafe: bool = False):
    """The classification head (weight (K, D), bias (K,)) of a classifier checkpoint, or None."""
    state_dict, _, _ = read_checkpoint(path, unsafe=unsafe)
    if "head.weight" not in state_dict or state_dict["head.weight"].ndim != 2:
        return None
    return state_dict["head.weight"].float(), state_dict["head.bias"].float()


def load_encoder_and_data(args, splits=("train", "val")):
    """(model on args.device in eval mode, info, [dataset per split]) from --resume and the data flags.

    Unset data flags default to the checkpoint's (``inherit_data_args``); a pretraining ChannelMAE is put in
    'independent' mode, where mask ratio 0 keeps every token.
    """
    model, info = model_from_checkpoint(args.resume, input_size=args.input_size, unsafe=args.unsafe_load)
    if info["kind"] == "pretrain" and is_channel_model(model):
        model.mask_mode = "independent"
    model.to(args.device)
    inherit_data_args(args, info["args"], model)
    datasets = [eval_dataset(args, s) for s in splits]
    for d in datasets:
        d.skip_bad_samples = False
    return model, info, datasets


def vocabulary_size(model, dataset) -> int:
    """Slots of a bag-of-channels embedding: the model's embedding rows (a channel model's ids are rows, mapped by
    name), else the channels in the files (a whole-patch model's ids are file positions)."""
    if is_channel_model(model):
        return model.channel_embed.shape[0]
    return max(dataset.num_channels, max(dataset.channel_ids) + 1)
