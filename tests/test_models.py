import pytest
import torch

import models_chamae
import models_mae
import models_vit
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2)


def mae(in_chans=3, img_size=32, patch_size=8, **kwargs):
    return models_chamae.create_model(
        "mae_vit_tiny_patch16", img_size=img_size, patch_size=patch_size, in_chans=in_chans, **{**TINY, **kwargs}
    )


def chamae(in_chans=3, img_size=32, patch_size=8, **kwargs):
    return models_chamae.create_model(
        "chamae_vit_tiny_patch16", img_size=img_size, patch_size=patch_size, in_chans=in_chans, **{**TINY, **kwargs}
    )


def channelvit(in_chans=5, **kwargs):
    kwargs = {**TINY_VIT, "img_size": 32, "patch_size": 8, "in_chans": in_chans, "num_classes": 7, **kwargs}
    return models_vit.create_model("channelvit_tiny_patch16", **kwargs)


@pytest.mark.parametrize("build", [mae, chamae])
@pytest.mark.parametrize("C,H,p", [(1, 32, 8), (3, 32, 16), (5, 48, 8), (8, 64, 16)])
def test_patchify_unpatchify_roundtrip(build, C, H, p):
    model = build(in_chans=C, img_size=H, patch_size=p)
    imgs = torch.randn(2, C, H, H)
    patches = model.patchify(imgs)
    L = (H // p) ** 2
    expected = (2, L, p * p * C) if build is mae else (2, C * L, p * p)
    assert patches.shape == expected
    assert torch.equal(model.unpatchify(patches), imgs)


def test_mae_patch_layout_is_channel_fastest():
    model = mae(in_chans=3, patch_size=8)
    imgs = torch.randn(1, 3, 32, 32)
    patches = model.patchify(imgs)
    row, col, pi, pj, c = 2, 1, 3, 5, 2
    token = row * 4 + col
    assert patches[0, token, (pi * 8 + pj) * 3 + c] == imgs[0, c, row * 8 + pi, col * 8 + pj]


def test_chamae_patch_layout_is_channel_major():
    model = chamae(in_chans=3, patch_size=8)
    imgs = torch.randn(1, 3, 32, 32)
    patches = model.patchify(imgs)
    c, row, col, pi, pj = 2, 1, 3, 4, 6
    assert patches[0, c * 16 + row * 4 + col, pi * 8 + pj] == imgs[0, c, row * 8 + pi, col * 8 + pj]


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("build,C", [(mae, 3), (chamae, 1), (chamae, 5)])
def test_visible_token_count(build, C, mask_ratio):
    model = build(in_chans=C)
    latent, mask, ids_restore = model.forward_encoder(torch.randn(4, C, 32, 32), mask_ratio)
    T = 16 if build is mae else 16 * C
    visible = int(T * (1 - mask_ratio))
    assert latent.shape == (4, 1 + visible, 32)
    assert mask.shape == ids_restore.shape == (4, T)
    assert torch.equal((1 - mask).sum(dim=1), torch.full((4,), float(visible)))


@pytest.mark.parametrize("build", [mae, chamae])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_ignores_visible_patches(build, norm_pix_loss):
    model = build(in_chans=3, norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs)
    assert torch.allclose(loss, model.forward_loss(imgs, pred, mask))

    patches = model.patchify(imgs)
    visible = mask == 0
    patches[visible] = torch.randn_like(patches[visible]) * 10
    assert torch.allclose(loss, model.forward_loss(model.unpatchify(patches), pred, mask))

    masked = mask == 1
    patches[masked] = torch.randn_like(patches[masked])
    assert not torch.allclose(loss, model.forward_loss(model.unpatchify(patches), pred, mask))


def test_spatial_mode_masks_same_positions_in_every_channel():
    model = chamae(in_chans=5, mask_mode="spatial")
    _, mask, _ = model.forward_encoder(torch.randn(3, 5, 32, 32), 0.75)
    per_channel = mask.reshape(3, 5, 16)
    assert torch.equal(per_channel, per_channel[:, :1].expand_as(per_channel))
    assert torch.equal(per_channel[:, 0].sum(dim=1), torch.full((3,), 12.0))


@pytest.mark.parametrize("C,mask_ratio", [(2, 0.5), (5, 0.75), (8, 0.6)])
def test_channel_mode_hides_whole_channels(C, mask_ratio):
    model = chamae(in_chans=C, mask_mode="channel")
    _, mask, _ = model.forward_encoder(torch.randn(6, C, 32, 32), mask_ratio)
    per_channel = mask.reshape(6, C, 16)
    fully_hidden = (per_channel.sum(dim=2) == 16).sum(dim=1)
    expected_hidden = min(max(int(C * mask_ratio), 1), C - 1)
    assert torch.all(fully_hidden >= expected_hidden)
    assert torch.all((per_channel.sum(dim=2) < 16).any(dim=1)), "some channel must stay partly visible"
    assert torch.equal((1 - mask).sum(dim=1), torch.full((6,), float(int(C * 16 * (1 - mask_ratio)))))


@pytest.mark.parametrize("mask_mode", models_chamae.MASK_MODES)
def test_mask_ratio_zero_hides_nothing_in_every_mode(mask_mode):
    """mask_ratio 0 encodes every token, as extract_features asks; 'channel' used to hide a whole channel anyway."""
    model = chamae(in_chans=3, mask_mode=mask_mode)
    latent, mask, ids_restore = model.forward_encoder(torch.randn(2, 3, 32, 32), 0.0)
    assert latent.shape == (2, 1 + 3 * 16, 32) and not mask.any() and ids_restore.shape == (2, 3 * 16)


def test_chamae_permuted_channels_give_same_loss():
    model = chamae(in_chans=5, num_channels=8, mask_mode="spatial").eval()
    imgs = torch.randn(2, 5, 32, 32)
    channel_ids = torch.tensor([0, 3, 4, 6, 7])
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.manual_seed(1)
    loss, _, _ = model(imgs, channel_ids=channel_ids)
    torch.manual_seed(1)
    loss_perm, _, _ = model(imgs[:, perm], channel_ids=channel_ids[perm])
    assert torch.allclose(loss, loss_perm, rtol=1e-5)

    latent, _, _ = model.forward_encoder(imgs, 0.0, channel_ids)
    latent_perm, _, _ = model.forward_encoder(imgs[:, perm], 0.0, channel_ids[perm])
    assert torch.allclose(latent[:, 0], latent_perm[:, 0], atol=1e-5)


def test_chamae_accepts_channel_subset():
    model = chamae(in_chans=8, num_channels=8)
    loss, pred, mask = model(torch.randn(2, 3, 32, 32), channel_ids=torch.tensor([[1, 5, 7], [0, 2, 6]]))
    assert pred.shape == (2, 48, 64) and mask.shape == (2, 48)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="channel_ids of shape"):
        model(torch.randn(2, 3, 32, 32), channel_ids=torch.tensor([1, 5]))


@pytest.mark.parametrize("global_pool", [True, False])
def test_channelvit_permutation_invariance_and_subsets(global_pool):
    model = channelvit(in_chans=8, num_channels=8, global_pool=global_pool).eval()
    imgs = torch.randn(3, 5, 32, 32)
    channel_ids = torch.tensor([0, 2, 3, 5, 7])
    perm = torch.randperm(5)
    logits = model(imgs, channel_ids)
    assert logits.shape == (3, 7)
    assert torch.allclose(logits, model(imgs[:, perm], channel_ids[perm]), atol=1e-5)
    assert model(imgs[:, :2], channel_ids[:2]).shape == (3, 7)


def test_channelvit_hcs_samples_channels_in_training_only():
    model = channelvit(in_chans=6, hcs=True)
    seen = set()
    model.patch_embed.register_forward_hook(lambda m, args, out: seen.add(args[0].shape[0] // 2))
    torch.manual_seed(0)
    model.train()
    for _ in range(20):
        model(torch.randn(2, 6, 32, 32))
    assert len(seen) > 2 and seen <= set(range(1, 7))
    seen.clear()
    model.eval()
    model(torch.randn(2, 6, 32, 32))
    assert seen == {6}


def test_chamae_c1_and_mae_losses_have_same_magnitude():
    torch.manual_seed(0)
    imgs = torch.rand(4, 1, 32, 32)
    losses = []
    for build in (mae, chamae):
        torch.manual_seed(0)
        loss, _, _ = build(in_chans=1, norm_pix_loss=True)(imgs)
        losses.append(loss.item())
    assert 0.5 < losses[0] / losses[1] < 2.0, losses


def assert_every_parameter_gets_gradient(model, loss):
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("decoder", ["full", "cross"])
@pytest.mark.parametrize(
    "build,kwargs",
    [
        (mae, {}),
        (chamae, {"mask_mode": "independent"}),
        (chamae, {"mask_mode": "spatial"}),
        (chamae, {"mask_mode": "channel"}),
    ],
)
def test_gradients_reach_every_pretraining_parameter(build, kwargs, decoder):
    model = build(in_chans=3, decoder=decoder, decode_ratio=0.5, **kwargs)
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    assert_every_parameter_gets_gradient(model, loss)


@pytest.mark.parametrize("name", ["vit_tiny_patch16", "channelvit_tiny_patch16"])
def test_gradients_reach_every_classifier_parameter(name):
    model = models_vit.create_model(name, img_size=32, patch_size=8, in_chans=3, num_classes=4, **TINY_VIT)
    assert_every_parameter_gets_gradient(model, model(torch.randn(2, 3, 32, 32)).sum())


def loss_and_gradients(model, imgs):
    """(loss, {name: grad}) of one forward + backward of a pretraining model with the masks of seed 0."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, _, _ = model(imgs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_matches_plain_forward_and_backward():
    model = chamae(in_chans=3, depth=2)
    imgs = torch.randn(2, 3, 32, 32)
    loss, grads = loss_and_gradients(model, imgs)
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = loss_and_gradients(model, imgs)
    assert torch.allclose(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "pretrain_name,finetune_name",
    [("mae_vit_tiny_patch16", "vit_tiny_patch16"), ("chamae_vit_tiny_patch16", "channelvit_tiny_patch16")],
)
@pytest.mark.parametrize("global_pool", [True, False])
def test_pretrain_state_dict_loads_into_classifier(pretrain_name, finetune_name, global_pool):
    size = dict(img_size=32, patch_size=8, in_chans=4)
    pretrained = models_chamae.create_model(pretrain_name, **size, **TINY)
    classifier = models_vit.create_model(finetune_name, num_classes=3, global_pool=global_pool, **size, **TINY_VIT)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("decoder") and k != "mask_token"}
    if global_pool:
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    result = classifier.load_state_dict(state, strict=False)
    expected_missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    assert set(result.missing_keys) == expected_missing
    assert result.unexpected_keys == []


def test_official_key_names():
    keys = set(models_chamae.create_model("mae_vit_base_patch16").state_dict())
    for key in [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.11.attn.qkv.bias",
        "blocks.0.mlp.fc2.weight",
        "norm.weight",
        "decoder_embed.weight",
        "mask_token",
        "decoder_pos_embed",
        "decoder_blocks.7.norm2.bias",
        "decoder_norm.bias",
        "decoder_pred.weight",
    ]:
        assert key in keys


def test_model_names():
    for size in ["tiny_patch16", "small_patch16", "base_patch16", "large_patch16", "huge_patch14"]:
        for prefix in ["mae_vit_", "chamae_vit_", "channelmae_vit_"]:
            assert prefix + size in models_chamae.PRETRAIN_MODELS
        for prefix in ["vit_", "channelvit_"]:
            assert prefix + size in models_vit.FINETUNE_MODELS
    alias = models_chamae.create_model("channelmae_vit_tiny_patch16", img_size=32, patch_size=8, **TINY)
    assert isinstance(alias, models_chamae.ChannelMaskedAutoencoderViT)
    with pytest.raises(ValueError, match="unknown --model"):
        models_chamae.create_model("mae_vit_gigantic")
    with pytest.raises(ValueError, match="--mask_mode and --hcs"):
        models_chamae.create_model("mae_vit_tiny_patch16", mask_mode="spatial")


def test_cross_decoder_decodes_requested_fraction():
    model = chamae(in_chans=3, decoder="cross", decode_ratio=0.25)
    latent, mask, ids_restore = model.forward_encoder(torch.randn(2, 3, 32, 32), 0.75)
    pred, decoded = model.forward_decoder(latent, ids_restore, None, 0.25)
    assert pred.shape == (2, 48, 64)
    assert torch.equal(decoded.sum(dim=1), torch.full((2,), float(int(36 * 0.25))))
    assert torch.all(mask[decoded == 1] == 1), "only masked tokens are decoded"
    assert torch.all(pred[decoded == 0] == 0)
    _, decoded_all = model.forward_decoder(latent, ids_restore, torch.tensor([0, 1, 2]), 1.0)
    assert torch.equal(decoded_all, mask)


def test_cross_decoder_loss_counts_only_decoded_tokens():
    model = chamae(in_chans=3, decoder="cross", decode_ratio=0.5)
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    pred, decoded = model.forward_decoder(latent, ids_restore, None, 0.5)
    loss = model.forward_loss(imgs, pred, decoded)
    patches = model.patchify(imgs)
    skipped = (mask == 1) & (decoded == 0)
    assert skipped.any()
    patches[skipped] += 3.0
    assert torch.allclose(loss, model.forward_loss(model.unpatchify(patches), pred, decoded))
    patches[decoded == 1] += 3.0
    assert not torch.allclose(loss, model.forward_loss(model.unpatchify(patches), pred, decoded))


def test_pos_embed_interpolation():
    model_224 = models_vit.create_model("vit_tiny_patch16", num_classes=0, **TINY_VIT)
    model_448 = models_vit.create_model("vit_tiny_patch16", img_size=448, num_classes=0, **TINY_VIT)
    table = torch.from_numpy(get_2d_sincos_pos_embed(32, 14, cls_token=True)).float().unsqueeze(0)
    table[:, 0] = torch.randn(32)
    same = {"pos_embed": table.clone()}
    assert not interpolate_pos_embed(model_224, same)
    assert torch.equal(same["pos_embed"], table)

    resized = {"pos_embed": table.clone()}
    assert interpolate_pos_embed(model_448, resized)
    assert resized["pos_embed"].shape == model_448.pos_embed.shape == (1, 1 + 28 * 28, 32)
    assert torch.equal(resized["pos_embed"][:, 0], table[:, 0])
    model_448.load_state_dict(resized, strict=False)


def test_sincos_table_properties():
    table = get_2d_sincos_pos_embed(16, (3, 5), cls_token=True)
    assert table.shape == (16, 16)
    assert (table[0] == 0).all()
    assert len({tuple(row) for row in table[1:].round(6)}) == 15
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(18, 4)


def test_mask_ratio_leaving_nothing_visible_is_an_error():
    with pytest.raises(ValueError, match="mask_ratio"):
        mae()(torch.randn(1, 3, 32, 32), mask_ratio=1.0)


def test_mae_default_sizes_match_published_parameter_counts():
    base = models_mae.create_model("mae_vit_base_patch16")
    assert round(sum(p.numel() for p in base.parameters()) / 1e6, 1) == 111.9
