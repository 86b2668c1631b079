"""Classifiers for fine-tuning and linear probing: ViT (timm) and ChannelViT.

`global_pool=True` averages the patch tokens and normalises with `fc_norm` (MAE fine-tuning); False uses the
class token after `norm`. Encoder keys equal those of the matching pretraining model, so a pretraining
checkpoint loads with only `head.*` (and `fc_norm.*`) missing.
"""

from functools import partial

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from models_chamae import embed_channels, expand_channel_ids, hierarchical_channel_sampling
from models_mae import SIZES, LayerNorm, size_name


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT with MAE's boolean `global_pool`; `channel_ids` is accepted and ignored (fixed channel order)."""

    def __init__(self, global_pool=False, **kwargs):
        kwargs.setdefault("norm_layer", LayerNorm)
        super().__init__(global_pool="avg" if global_pool else "token", fc_norm=global_pool, **kwargs)

    def forward(self, x, channel_ids=None, attn_mask=None, is_causal=False):
        """x: (N, C, H, W) -> logits (N, num_classes)."""
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for ``timm.optim.param_groups_layer_decay`` (BEiT / MAE layer-wise lr decay).

        The tokenizer (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``channel_embed``) is layer 0, ``blocks.i``
        layer ``i + 1`` and everything else (final ``norm``, ``fc_norm``, ``head``) the top layer ``depth + 1``, so
        with ``layer_decay`` d the head trains at the full lr and the tokenizer at ``d ** (depth + 1)``. timm's own
        matcher would put the final norm with the last block and ``channel_embed`` at the top.
        """
        return dict(stem=r"^(?:cls_token|pos_embed|patch_embed|channel_embed)(?:\.|$)", blocks=r"^blocks\.(\d+)\.")


class ChannelVisionTransformer(VisionTransformer):
    """ChannelViT: one token per (channel, patch), a shared single-plane patch projection, channel embeddings.

    num_channels: number of known channels; inputs may hold any subset in any order, named by `channel_ids`.
    hcs: hierarchical channel sampling in training mode. Pooling over the C*L tokens makes the output
    invariant to the order of the channels.
    """

    def __init__(self, in_chans=3, num_channels=None, hcs=False, **kwargs):
        super().__init__(in_chans=1, **kwargs)
        self.in_chans = in_chans
        self.num_channels = num_channels or in_chans
        self.hcs = hcs
        self.channel_embed = nn.Parameter(torch.zeros(self.num_channels, self.embed_dim))
        nn.init.normal_(self.channel_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self):
        return super().no_weight_decay() | {"channel_embed"}

    def tokens(self, x, channel_ids=None):
        """x: (N, C, H, W) -> (N, 1 + C*L, D): class token, then channel-major patch tokens."""
        x = embed_channels(self.patch_embed, x, self.pos_embed, self.channel_embed, channel_ids)
        cls_token = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls_token, x], dim=1))

    def forward_features(self, x, channel_ids=None, attn_mask=None, is_causal=False):
        """x: (N, C, H, W) -> normalised tokens (N, 1 + C*L, D)."""
        x = self.norm_pre(self.tokens(x, channel_ids))
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x, channel_ids=None, attn_mask=None, is_causal=False):
        """x: (N, C, H, W), channel_ids: None, (C,) or (N, C) -> logits (N, num_classes)."""
        if self.hcs and self.training:
            channel_ids = expand_channel_ids(channel_ids, x.shape[0], x.shape[1], x.device)
            x, channel_ids = hierarchical_channel_sampling(x, channel_ids)
        x = self.forward_features(x, channel_ids, attn_mask=attn_mask, is_causal=is_causal)
        return self.forward_head(x)


def probe_head(head: nn.Linear) -> nn.Sequential:
    """A linear probe's head: BatchNorm without affine parameters (MAE's), then ``head``."""
    return nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)


def build_sized(cls, size, **kwargs):
    """Instantiate `cls` with the encoder size's defaults; kwargs override them."""
    return cls(**{**SIZES[size], **kwargs})


MODELS = {}
for _size in SIZES:
    MODELS[size_name(_size)] = partial(build_sized, VisionTransformer, _size)
    MODELS[f"channel{size_name(_size)}"] = partial(build_sized, ChannelVisionTransformer, _size)
FINETUNE_MODELS = sorted(MODELS)


def create_model(name, **kwargs):
    """Build a classifier by name: vit_* or channelvit_*. ViTs ignore num_channels and refuse HCS."""
    if name not in MODELS:
        raise ValueError(f"unknown --model '{name}'; choose from {FINETUNE_MODELS}")
    if name.startswith("vit_"):
        kwargs.pop("num_channels", None)
        if kwargs.pop("hcs", False):
            raise ValueError(f"--hcs needs a channelvit_* model, not '{name}'")
    return MODELS[name](**kwargs)


vit_tiny_patch16 = MODELS["vit_tiny_patch16"]
vit_small_patch16 = MODELS["vit_small_patch16"]
vit_base_patch16 = MODELS["vit_base_patch16"]
vit_large_patch16 = MODELS["vit_large_patch16"]
vit_huge_patch14 = MODELS["vit_huge_patch14"]
channelvit_tiny_patch16 = MODELS["channelvit_tiny_patch16"]
channelvit_small_patch16 = MODELS["channelvit_small_patch16"]
channelvit_base_patch16 = MODELS["channelvit_base_patch16"]
channelvit_large_patch16 = MODELS["channelvit_large_patch16"]
channelvit_huge_patch14 = MODELS["channelvit_huge_patch14"]
