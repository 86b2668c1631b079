"""Masked Autoencoder with a Vision Transformer backbone (He et al., 2021), on timm's fused-attention blocks.

State-dict keys follow the published MAE checkpoints, so `mae_pretrain_vit_*.pth`, `*_full.pth` and
`mae_visualize_vit_*.pth` load without renaming. The pixel layout of `patchify` (channel index fastest) matches
the published decoders. `models_chamae` subclasses this model and changes only how images become tokens, how
tokens are masked and how targets are laid out.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block

from util.pos_embed import sincos_parameter

DECODERS = ("full", "cross")
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class CrossAttention(nn.Module):
    """Multi-head attention of queries (N, K, D) over a context (N, M, D), through fused SDPA."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        N, K, D = x.shape
        head_dim = D // self.num_heads
        q = self.q(x).reshape(N, K, self.num_heads, head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(N, context.shape[1], 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(x.transpose(1, 2).reshape(N, K, D))


class CrossAttentionBlock(nn.Module):
    """CrossMAE decoder block: queries cross-attend to the visible latents, then an MLP (pre-norm residuals)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm_context = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, context):
        x = x + self.attn(self.norm1(x), self.norm_context(context))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoderViT(nn.Module):
    """MAE: encode a random subset of patches, reconstruct the pixels of the others.

    decoder: 'full' (MAE: mask tokens and visible latents self-attend over the whole sequence) or 'cross'
    (CrossMAE: queries for a random `decode_ratio` fraction of the masked tokens cross-attend to the visible
    latents). Only the decoded tokens enter the loss.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_layer=LayerNorm,
        norm_pix_loss=False,
        decoder="full",
        decode_ratio=1.0,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"--decoder must be one of {DECODERS}, got '{decoder}'")
        if not 0.0 < decode_ratio <= 1.0:
            raise ValueError(f"--decode_ratio must be in (0, 1], got {decode_ratio}")
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.decoder = decoder
        self.decode_ratio = decode_ratio
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, self.token_in_chans, embed_dim)
        grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = sincos_parameter(embed_dim, grid_size)
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = sincos_parameter(decoder_embed_dim, grid_size)
        if decoder == "full":
            make_block = partial(Block, qkv_bias=True, norm_layer=norm_layer)
        else:
            make_block = partial(CrossAttentionBlock, norm_layer=norm_layer)
        self.decoder_blocks = nn.ModuleList(
            [make_block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * self.token_in_chans, bias=True)
        self.initialize_weights()

    @property
    def token_in_chans(self):
        """Image planes that one patch token is made of: all channels for MAE."""
        return self.in_chans

    @property
    def num_patches(self):
        """L: patch positions per image plane."""
        return self.patch_embed.num_patches

    def initialize_weights(self):
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def patchify(self, imgs):
        """imgs: (N, C, H, W) -> (N, L, p*p*C), pixels in (row, column, channel) order within a patch.

        A permutation rather than einsum, which CUDA autocast would run in half precision, rounding the targets.
        """
        N, C, H, W = imgs.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (n c h p w q) -> (n h w p q c)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x):
        """x: (N, L, p*p*C) -> (N, C, H, W), on the model's patch grid."""
        p = self.patch_size
        h, w = self.patch_embed.grid_size
        C = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (n h w p q c) -> (n c h p w q)
        return x.reshape(x.shape[0], C, h * p, w * p)

    def select_channels(self, imgs, channel_ids):
        """Hook for channel sub-sampling during training; MAE always sees every channel."""
        return imgs, channel_ids

    def tokenize(self, imgs, channel_ids=None):
        """imgs: (N, C, H, W) -> patch tokens with position embedding (N, L, D)."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def decoder_position(self, channel_ids, num_tokens):
        """Decoder position embedding for the class token and all `num_tokens` patch tokens: (1, 1 + T, Dd)."""
        return self.decoder_pos_embed

    def masking_noise(self, N, T, mask_ratio, device):
        """Per-token noise (N, T) whose argsort decides masking, and how many tokens stay visible."""
        return torch.rand(N, T, device=device), int(T * (1 - mask_ratio))

    def random_masking(self, x, mask_ratio):
        """Keep the `len_keep` tokens of lowest noise per sample.

        x: (N, T, D) -> (x_visible (N, len_keep, D), mask (N, T) float32 with 1 = masked, ids_restore (N, T)).
        """
        N, T, D = x.shape
        noise, len_keep = self.masking_noise(N, T, mask_ratio, x.device)
        if len_keep < 1:
            raise ValueError(f"--mask_ratio {mask_ratio} leaves no visible token out of {T}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = (ids_restore >= len_keep).float()
        return x_visible, mask, ids_restore

    def run_blocks(self, blocks, x):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    def forward_encoder(self, imgs, mask_ratio, channel_ids=None):
        """imgs: (N, C, H, W) -> latent (N, 1 + V, D), mask (N, T), ids_restore (N, T)."""
        x = self.tokenize(imgs, channel_ids)
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls_token = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.run_blocks(self.blocks, torch.cat([cls_token, x], dim=1))
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore, channel_ids=None, decode_ratio=1.0):
        """latent: (N, 1 + V, D) -> pred (N, T, p*p*c), decoded (N, T) float32, 1 where pred predicts a masked token.

        pred takes the autocast dtype; decoded stays float32, whose sum is the loss's normaliser.
        """
        if self.decoder == "cross":
            return self.forward_cross_decoder(latent, ids_restore, channel_ids, decode_ratio)
        x = self.decoder_embed(latent)
        N, T = ids_restore.shape
        num_visible = x.shape[1] - 1
        mask_tokens = self.mask_token.expand(N, T - num_visible, -1)
        x_patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_patches = torch.gather(x_patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_patches], dim=1) + self.decoder_position(channel_ids, T)
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return pred, (ids_restore >= num_visible).float()

    def forward_cross_decoder(self, latent, ids_restore, channel_ids, decode_ratio):
        """Decode a random `decode_ratio` fraction of the masked tokens by cross-attention to the visible latents."""
        N, T = ids_restore.shape
        num_visible = latent.shape[1] - 1
        num_masked = T - num_visible
        num_decoded = max(1, int(num_masked * decode_ratio))
        position = self.decoder_position(channel_ids, T).expand(N, -1, -1)
        cls_position, patch_position = position[:, :1], position[:, 1:]
        ids_shuffle = torch.argsort(ids_restore, dim=1)
        ids_visible, ids_masked = ids_shuffle[:, :num_visible], ids_shuffle[:, num_visible:]
        pick = torch.argsort(torch.rand(N, num_masked, device=latent.device), dim=1)[:, :num_decoded]
        ids_decoded = torch.gather(ids_masked, 1, pick)

        context = self.decoder_embed(latent)
        context = context + torch.cat([cls_position, gather_tokens(patch_position, ids_visible)], dim=1)
        x = self.mask_token + gather_tokens(patch_position, ids_decoded)
        for blk in self.decoder_blocks:
            x = blk(x, context)
        pred_decoded = self.decoder_pred(self.decoder_norm(x))
        pred = pred_decoded.new_zeros(N, T, pred_decoded.shape[2])
        pred = pred.scatter(1, ids_decoded.unsqueeze(-1).expand(-1, -1, pred.shape[2]), pred_decoded)
        decoded = torch.zeros(N, T, device=latent.device).scatter(1, ids_decoded, 1.0)
        return pred, decoded

    def loss_target(self, imgs):
        """imgs: (N, C, H, W) -> what pred predicts, (N, T, P) float32: the patches, under norm_pix_loss each
        normalised by its own mean and variance."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, decoded):
        """Mean squared error over the decoded masked tokens, every reduction in float32 whatever pred's dtype.

        imgs: (N, C, H, W); pred: (N, T, P); decoded: (N, T), 1 for tokens that count in the loss.
        """
        loss = ((pred.float() - self.loss_target(imgs)) ** 2).mean(dim=-1)
        decoded = decoded.float()
        return (loss * decoded).sum() / decoded.sum()

    def forward(self, imgs, mask_ratio=0.75, channel_ids=None):
        """imgs: (N, C, H, W) -> (loss, pred (N, T, P), mask (N, T) with 1 = masked)."""
        imgs, channel_ids = self.select_channels(imgs, channel_ids)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, channel_ids)
        decode_ratio = self.decode_ratio if self.training else 1.0
        pred, decoded = self.forward_decoder(latent, ids_restore, channel_ids, decode_ratio)
        return self.forward_loss(imgs, pred, decoded), pred, mask


def gather_tokens(x, ids):
    """x: (N, T, D), ids: (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[2]))


SIZES = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
"""Encoder sizes of ViT-Ti/S/B/L/H."""

DECODER_SIZES = {
    "tiny": dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "small": dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
}
"""Lighter decoders for the small encoders; the others use MAE's 512 wide, 8 deep, 16 heads."""


def size_name(size):
    """'huge' -> 'vit_huge_patch14'; other sizes use patch 16."""
    return f"vit_{size}_patch{SIZES[size]['patch_size']}"


def build_sized(cls, size, **kwargs):
    """Instantiate `cls` with the size's defaults, any of which kwargs may override."""
    return cls(**{**SIZES[size], **DECODER_SIZES.get(size, {}), **kwargs})


MODELS = {f"mae_{size_name(size)}": partial(build_sized, MaskedAutoencoderViT, size) for size in SIZES}


def create_model(name, **kwargs):
    """Build a registered MAE by name, e.g. create_model('mae_vit_base_patch16', norm_pix_loss=True)."""
    if name not in MODELS:
        raise ValueError(f"unknown --model '{name}'; choose from {sorted(MODELS)}")
    return MODELS[name](**kwargs)


mae_vit_tiny_patch16 = MODELS["mae_vit_tiny_patch16"]
mae_vit_small_patch16 = MODELS["mae_vit_small_patch16"]
mae_vit_base_patch16 = MODELS["mae_vit_base_patch16"]
mae_vit_large_patch16 = MODELS["mae_vit_large_patch16"]
mae_vit_huge_patch14 = MODELS["mae_vit_huge_patch14"]
