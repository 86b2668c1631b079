"""ChannelMAE: a Masked Autoencoder whose tokens are (channel, patch) pairs, as in ChannelViT (Bao et al., 2023).

Every channel goes through one shared single-plane patch projection; a token gets the 2-D position embedding of
its patch and the learned embedding of its channel. Tokens are laid out channel-major: (N, C*L, D). Only
tokenization, masking and the target layout differ from `models_mae.MaskedAutoencoderViT`.
"""

from functools import partial

import torch
import torch.nn as nn

import models_mae
from models_mae import MaskedAutoencoderViT

MASK_MODES = ("independent", "spatial", "channel")


def expand_channel_ids(channel_ids, N, C, device):
    """None, (C,) or (N, C) channel ids -> a (N, C) long tensor; None means planes 0..C-1 in order."""
    if channel_ids is None:
        return torch.arange(C, device=device).expand(N, C)
    channel_ids = torch.as_tensor(channel_ids, device=device, dtype=torch.long)
    if channel_ids.dim() == 1:
        channel_ids = channel_ids.expand(N, -1)
    if tuple(channel_ids.shape) != (N, C):
        raise ValueError(f"channel_ids of shape {tuple(channel_ids.shape)} do not match {C} input channels")
    return channel_ids


def hierarchical_channel_sampling(imgs, channel_ids):
    """HCS: draw k ~ U{1..C}, then k of the C channels without replacement, the same for the whole batch.

    imgs: (N, C, H, W), channel_ids: (N, C) -> (N, k, H, W), (N, k).
    """
    C = imgs.shape[1]
    k = int(torch.randint(1, C + 1, ()))
    keep = torch.randperm(C, device=imgs.device)[:k]
    return imgs[:, keep], channel_ids[:, keep]


def embed_channels(patch_embed, imgs, pos_embed, channel_embed, channel_ids):
    """Per-channel patch tokens: imgs (N, C, H, W) -> (N, C*L, D), channel-major.

    patch_embed: a single-plane PatchEmbed; pos_embed: (1, 1 + L, D) with a class-token row, shared by every
    channel; channel_embed: (num_channels, D); channel_ids: None, (C,) or (N, C).
    """
    N, C, H, W = imgs.shape
    channel_ids = expand_channel_ids(channel_ids, N, C, imgs.device)
    x = patch_embed(imgs.reshape(N * C, 1, H, W))
    x = x.reshape(N, C, x.shape[1], x.shape[2]) + pos_embed[:, None, 1:]
    x = x + channel_embed[channel_ids].unsqueeze(2)
    return x.flatten(1, 2)


class ChannelMaskedAutoencoderViT(MaskedAutoencoderViT):
    """MAE over per-channel tokens.

    num_channels: how many distinct channels exist (size of the channel embedding tables); an input may hold
    any subset of them, in any order, named by `channel_ids`. mask_mode: 'independent' (any token),
    'spatial' (the same positions in every channel) or 'channel' (whole channels hidden, at least one, at most
    C - 1, plus a random token mask on the others). In every mode mask_ratio 0 hides nothing, so
    `forward_encoder(imgs, 0.0)` encodes every token. hcs: hierarchical channel sampling during training.
    """

    def __init__(self, in_chans=3, num_channels=None, mask_mode="independent", hcs=False, **kwargs):
        if mask_mode not in MASK_MODES:
            raise ValueError(f"--mask_mode must be one of {MASK_MODES}, got '{mask_mode}'")
        super().__init__(in_chans=in_chans, **kwargs)
        self.num_channels = num_channels or in_chans
        self.mask_mode = mask_mode
        self.hcs = hcs
        self.channel_embed = nn.Parameter(torch.zeros(self.num_channels, self.cls_token.shape[-1]))
        self.decoder_channel_embed = nn.Parameter(torch.zeros(self.num_channels, self.mask_token.shape[-1]))
        nn.init.normal_(self.channel_embed, std=0.02)
        nn.init.normal_(self.decoder_channel_embed, std=0.02)

    @property
    def token_in_chans(self):
        """One token covers one image plane."""
        return 1

    def patchify(self, imgs):
        """imgs: (N, C, H, W) -> (N, C*L, p*p), channel-major."""
        N, C, H, W = imgs.shape
        return super().patchify(imgs.reshape(N * C, 1, H, W)).reshape(N, -1, self.patch_size**2)

    def unpatchify(self, x):
        """x: (N, C*L, p*p) -> (N, C, H, W)."""
        N, T, P = x.shape
        C = T // self.num_patches
        return super().unpatchify(x.reshape(N * C, self.num_patches, P)).reshape(N, C, *self.patch_embed.img_size)

    def select_channels(self, imgs, channel_ids):
        channel_ids = expand_channel_ids(channel_ids, imgs.shape[0], imgs.shape[1], imgs.device)
        if self.hcs and self.training:
            return hierarchical_channel_sampling(imgs, channel_ids)
        return imgs, channel_ids

    def tokenize(self, imgs, channel_ids=None):
        return embed_channels(self.patch_embed, imgs, self.pos_embed, self.channel_embed, channel_ids)

    def decoder_position(self, channel_ids, num_tokens):
        """(N, 1 + C*L, Dd): the class-token row, then position + channel embedding for each token."""
        C = num_tokens // self.num_patches
        if channel_ids is None:
            channel_ids = torch.arange(C, device=self.mask_token.device)
        channel_ids = torch.as_tensor(channel_ids, device=self.mask_token.device)
        N = len(channel_ids) if channel_ids.dim() == 2 else 1
        channel_ids = expand_channel_ids(channel_ids.reshape(N, -1), N, C, self.mask_token.device)
        patch = self.decoder_pos_embed[:, None, 1:] + self.decoder_channel_embed[channel_ids].unsqueeze(2)
        return torch.cat([self.decoder_pos_embed[:, :1].expand(N, -1, -1), patch.flatten(1, 2)], dim=1)

    def masking_noise(self, N, T, mask_ratio, device):
        L = self.num_patches
        C = T // L
        if self.mask_mode == "spatial":
            noise = torch.rand(N, 1, L, device=device).expand(N, C, L).reshape(N, T)
            return noise, C * int(L * (1 - mask_ratio))
        if self.mask_mode == "channel" and C > 1 and mask_ratio > 0:
            num_hidden = min(max(int(C * mask_ratio), 1), C - 1)
            hidden = torch.rand(N, C, device=device).argsort(dim=1) < num_hidden
            noise = torch.rand(N, C, L, device=device) + hidden.unsqueeze(-1)
            return noise.reshape(N, T), min(int(T * (1 - mask_ratio)), (C - num_hidden) * L)
        return super().masking_noise(N, T, mask_ratio, device)


MODELS = {
    f"chamae_{models_mae.size_name(size)}": partial(models_mae.build_sized, ChannelMaskedAutoencoderViT, size)
    for size in models_mae.SIZES
}
ALIASES = {name.replace("chamae_", "channelmae_"): name for name in MODELS}
PRETRAIN_MODELS = sorted([*models_mae.MODELS, *MODELS, *ALIASES])


def create_model(name, **kwargs):
    """Build any pretraining model by name: mae_vit_*, chamae_vit_* or channelmae_vit_*.

    MAE models see all channels as one token: they ignore num_channels and refuse a channel mask mode or HCS.
    """
    name = ALIASES.get(name, name)
    if name in models_mae.MODELS:
        kwargs.pop("num_channels", None)
        if kwargs.pop("mask_mode", "independent") != "independent" or kwargs.pop("hcs", False):
            raise ValueError(f"--mask_mode and --hcs need a chamae_* model; '{name}' masks whole patches")
        return models_mae.create_model(name, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown --model '{name}'; choose from {PRETRAIN_MODELS}")
    return MODELS[name](**kwargs)


chamae_vit_tiny_patch16 = MODELS["chamae_vit_tiny_patch16"]
chamae_vit_small_patch16 = MODELS["chamae_vit_small_patch16"]
chamae_vit_base_patch16 = MODELS["chamae_vit_base_patch16"]
chamae_vit_large_patch16 = MODELS["chamae_vit_large_patch16"]
chamae_vit_huge_patch14 = MODELS["chamae_vit_huge_patch14"]
channelmae_vit_tiny_patch16 = chamae_vit_tiny_patch16
channelmae_vit_small_patch16 = chamae_vit_small_patch16
channelmae_vit_base_patch16 = chamae_vit_base_patch16
channelmae_vit_large_patch16 = chamae_vit_large_patch16
channelmae_vit_huge_patch14 = chamae_vit_huge_patch14
