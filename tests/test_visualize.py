"""Reconstruction grids (util/vis.py), visualize.py, checkpoint loading (models_checkpoint.py), plot_logs.py."""

import builtins
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
import models_chamae
import visualize
from models_checkpoint import model_from_checkpoint
from util.data.evaluation import eval_dataset
from util.errors import CheckpointError
from util.vis import (
    NORM_PIX_NOTE,
    NOTE_LINE_H,
    PANELS,
    GridLayout,
    auto_scale,
    fixed_batch,
    log_reconstructions,
    reconstruct,
    reconstruction_grid,
    render_grid,
)

ROOT = Path(__file__).resolve().parents[1]
IHC = ROOT / "sample_data" / "ihc"
DIGITS = ROOT / "sample_data" / "digits"
TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
TINY_KWARGS = [f"{k}={v}" for k, v in TINY.items()]


def tiny(name="chamae_vit_tiny_patch16", in_chans=6, img_size=64, **kwargs):
    return models_chamae.create_model(name, img_size=img_size, patch_size=8, in_chans=in_chans, **{**TINY, **kwargs})


def save_ours(model, path, name, input_size, data_path, **extra_args):
    """A checkpoint laid out as util.checkpoint.save_model writes it."""
    args = dict(model=name, input_size=input_size, patch_size=8, model_kwargs=TINY_KWARGS, data_path=str(data_path))
    torch.save({"model": model.state_dict(), "args": {**args, **extra_args}, "epoch": 0}, path)
    return str(path)


def train(model, imgs, steps, lr=2e-3, batch_size=16, seed=0):
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    for _ in range(steps):
        batch = imgs[torch.randint(0, len(imgs), (batch_size,))]
        loss, _, _ = model(batch, mask_ratio=0.75)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def layout_size(n, rows, tile, labels=True):
    layout = GridLayout(n, rows, tile, tile, labels=labels)
    return layout.height, layout.width


@pytest.mark.parametrize("C,rgb,rows", [(6, None, 6), (3, "auto", 4), (6, (0, 1, 2), 7), (1, "auto", 1)])
@pytest.mark.parametrize("labels", [True, False])
def test_grid_size(C, rgb, rows, labels):
    model = tiny(in_chans=C, img_size=32)
    grid, mse = reconstruction_grid(model, torch.randn(2, C, 32, 32), rgb=rgb, labels=labels)
    assert grid.dtype == np.uint8 and grid.shape == (*layout_size(2, rows, 32 * auto_scale(32), labels), 3)
    assert len(mse) == C and all(np.isfinite(mse))


def test_grid_layout_geometry():
    layout = GridLayout(samples=2, rows=3, tile_h=64, tile_w=48, labels=False, gap=2, sample_gap=6)
    assert layout.width == 2 + len(PANELS) * (48 + 2)
    assert layout.height == 2 + 6 * (64 + 2) + 6
    assert layout.origin(1, 0, 1) == (2 + 50, 2 + 3 * 66 + 6)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("name,C", [("mae_vit_tiny_patch16", 3), ("chamae_vit_tiny_patch16", 4)])
def test_masked_mse_equals_model_loss(name, C, norm_pix_loss):
    """The pixel-weighted mean of the per-channel MSEs is the model's loss (same mask): the MSE is measured in the
    loss's target space, per-patch normalised under norm_pix_loss."""
    model = tiny(name, in_chans=C, img_size=32, norm_pix_loss=norm_pix_loss).eval()
    imgs = torch.randn(3, C, 32, 32) * 3 + 1
    result = reconstruct(model, imgs, mask_ratio=0.75, seed=5)
    torch.manual_seed(5)
    loss, _, mask = model(imgs, mask_ratio=0.75)
    counts = result["masked"].sum(dim=(0, 2, 3)).double()
    assert torch.allclose((result["channel_mse"].double() * counts).sum() / counts.sum(), loss.double(), rtol=1e-5)
    assert result["masked"].float().mean() == pytest.approx(mask.mean().item())
    visible = ~result["masked"]
    assert torch.equal(result["pasted"][visible], imgs[visible])


def test_norm_pix_predictions_are_unnormalised(monkeypatch):
    """A perfect prediction of the normalised target patches reconstructs the image itself."""
    model = tiny(in_chans=2, img_size=32, norm_pix_loss=True).eval()
    imgs = torch.randn(2, 2, 32, 32) * 3 + 1

    def perfect(latent, ids_restore, channel_ids=None, decode_ratio=1.0):
        target = model.patchify(imgs)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return target, torch.ones(target.shape[:2])

    monkeypatch.setattr(model, "forward_decoder", perfect)
    result = reconstruct(model, imgs, mask_ratio=0.5)
    assert torch.allclose(result["recon"], imgs, atol=1e-4)
    assert result["channel_mse"].max() < 1e-8


@pytest.mark.parametrize("name,C", [("mae_vit_tiny_patch16", 3), ("chamae_vit_tiny_patch16", 2)])
def test_norm_pix_mse_does_not_use_the_hidden_patches_statistics(name, C):
    """Stretching the contrast of the hidden patches leaves the normalised targets, hence the MSE, as they were;
    the picture's reconstruction (drawn with the true patch mean and std) follows the stretched patches."""
    model = tiny(name, in_chans=C, img_size=32, norm_pix_loss=True).eval()
    imgs = torch.randn(2, C, 32, 32)
    result = reconstruct(model, imgs, mask_ratio=0.75, seed=1)
    masked = result["masked"]
    stretched = torch.where(masked, 10.0 * imgs + 5.0, imgs)
    again = reconstruct(model, stretched, mask_ratio=0.75, seed=1)
    assert torch.equal(again["masked"], masked)
    assert torch.allclose(again["mse"], result["mse"], rtol=1e-4)
    assert torch.allclose(again["recon"][masked], 10.0 * result["recon"][masked] + 5.0, rtol=1e-4, atol=1e-3)


def test_norm_pix_grid_says_what_it_shows():
    plain = reconstruct(tiny(in_chans=2, img_size=32), torch.randn(2, 2, 32, 32))
    norm_pix = reconstruct(tiny(in_chans=2, img_size=32, norm_pix_loss=True), torch.randn(2, 2, 32, 32))
    tile = 32 * auto_scale(32)
    assert render_grid(plain).shape == (*layout_size(2, 2, tile), 3)
    height, width = layout_size(2, 2, tile)
    assert render_grid(norm_pix).shape == (height + len(NORM_PIX_NOTE) * NOTE_LINE_H, width, 3)
    assert render_grid(norm_pix, labels=False).shape == (*layout_size(2, 2, tile, labels=False), 3)


def test_cross_decoder_marks_unpredicted_pixels():
    model = tiny(in_chans=2, img_size=32, decoder="cross")
    result = reconstruct(model, torch.randn(2, 2, 32, 32), mask_ratio=0.75)
    assert torch.equal(result["predicted"], result["masked"])


def test_reconstruction_leaves_rng_and_mode_alone():
    model = tiny(in_chans=2, img_size=32).train()
    imgs = torch.randn(2, 2, 32, 32)
    state = torch.get_rng_state()
    first, _ = reconstruction_grid(model, imgs, seed=3)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    again, _ = reconstruction_grid(model, imgs, seed=3)
    other, _ = reconstruction_grid(model, imgs, seed=4)
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_log_reconstructions_writes_png_and_tensorboard_image(tmp_path):
    class Writer:
        def __init__(self):
            self.images, self.scalars = [], []

        def add_image(self, tag, img, step, dataformats):
            self.images.append((tag, img.shape, step, dataformats))

        def add_scalar(self, tag, value, step):
            self.scalars.append(tag)

    dataset = eval_dataset(Namespace(data_path=str(IHC), input_size=32), "pretrain")
    imgs = fixed_batch(dataset, 3, seed=0)
    assert torch.equal(imgs, fixed_batch(dataset, 3, seed=0))
    model = tiny(img_size=32)
    writer = Writer()
    args = Namespace(mask_ratio=0.75, seed=0, output_dir=str(tmp_path))
    path = log_reconstructions(
        model, imgs, torch.arange(6), args, 7, writer, channel_names=["R", "G", "B", "H", "E", "D"]
    )
    assert path == str(tmp_path / "vis" / "epoch_007.png")
    png = np.asarray(Image.open(path))
    assert writer.images == [("reconstruction", png.shape, 8000, "HWC")]  # x = 1000 x epochs done
    assert writer.scalars == [f"vis_masked_mse/{c}" for c in "RGBHED"]


def test_visualize_cli_trained_differs_from_untrained(tmp_path, one_thread, capsys):
    """The PNG of a model trained a few dozen steps on the IHC tiles differs and has a lower masked MSE."""
    dataset = eval_dataset(Namespace(data_path=str(IHC), input_size=64), "pretrain")
    imgs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.manual_seed(0)
    model = tiny()
    untrained = save_ours(model, tmp_path / "untrained.pth", "chamae_vit_tiny_patch16", 64, IHC)
    trained = save_ours(train(model, imgs, 40), tmp_path / "trained.pth", "chamae_vit_tiny_patch16", 64, IHC)
    results = {}
    for name, ckpt in (("untrained", untrained), ("trained", trained)):
        out = tmp_path / f"{name}.png"
        args = visualize.get_args_parser().parse_args(
            ["--resume", ckpt, "--out", str(out), "--n", "3", "--rgb", "0,1,2", "--device", "cpu"]
        )
        grid, mse = visualize.main(args)
        png = np.asarray(Image.open(out))
        assert np.array_equal(png, grid)
        assert png.shape == (*layout_size(3, 7, 64), 3)
        results[name] = (png, np.mean(mse))
    assert not np.array_equal(results["untrained"][0], results["trained"][0])
    assert results["trained"][1] < 0.9 * results["untrained"][1]
    assert "masked MSE per channel (normalised pixels):" in capsys.readouterr().out


def test_visualize_published_format_needs_model_name(tmp_path):
    """{'model': state_dict} with DDP prefixes and no args: rebuilt from --model plus the tensor shapes."""
    torch.manual_seed(0)
    model = tiny("mae_vit_tiny_patch16", in_chans=1, img_size=32)
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="pass --model"):
        model_from_checkpoint(path)
    loaded, info = model_from_checkpoint(path, model="mae_vit_tiny_patch16", num_heads=2, decoder_num_heads=2)
    assert info["kind"] == "pretrain" and loaded.patch_embed.img_size == (32, 32)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    out = tmp_path / "recon.png"
    argv = [
        "--resume",
        str(path),
        "--model",
        "mae_vit_tiny_patch16",
        "--model_kwargs",
        "num_heads=2",
        "decoder_num_heads=2",
        "--data_path",
        str(DIGITS),
        "--out",
        str(out),
        "--n",
        "2",
        "--device",
        "cpu",
    ]
    visualize.main(visualize.get_args_parser().parse_args(argv))
    assert np.asarray(Image.open(out)).shape == (*layout_size(2, 1, 64), 3)


def test_checkpoint_at_another_input_size(tmp_path):
    model = tiny(in_chans=2, img_size=32)
    path = save_ours(model, tmp_path / "ckpt.pth", "chamae_vit_tiny_patch16", 32, IHC, norm_pix_loss=True)
    loaded, _ = model_from_checkpoint(path, input_size=64)
    assert loaded.patch_embed.img_size == (64, 64) and loaded.norm_pix_loss
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert loaded.pos_embed.shape[1] == 1 + 64


def test_wrong_model_family_is_refused(tmp_path):
    path = save_ours(tiny(in_chans=2, img_size=32), tmp_path / "ckpt.pth", "chamae_vit_tiny_patch16", 32, IHC)
    with pytest.raises(CheckpointError, match="per-channel tokens"):
        model_from_checkpoint(path, model="mae_vit_tiny_patch16")


@pytest.mark.parametrize("key", ["num_heads", "decoder_num_heads"])
def test_head_count_other_than_the_checkpoints_is_refused(key, tmp_path):
    """Heads do not show in the weights: an override of the recorded count would load and compute something else."""
    path = save_ours(tiny(in_chans=2, img_size=32), tmp_path / "ckpt.pth", "chamae_vit_tiny_patch16", 32, IHC)
    with pytest.raises(CheckpointError, match=rf"trained with {key}=2 \(--model_kwargs {key}=2\) but the model to "):
        model_from_checkpoint(path, **{key: 1})
    assert model_from_checkpoint(path, **{key: 2})[1]["kind"] == "pretrain"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_checkpoint_wrapper_prefixes_are_dropped(tmp_path, prefix):
    """State dicts saved from a DDP and/or torch.compile wrapper (compile(DDP(m)) gives '_orig_mod.module.') load."""
    torch.manual_seed(0)
    model = tiny("mae_vit_tiny_patch16", in_chans=1, img_size=32)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {prefix + k: v for k, v in model.state_dict().items()}}, path)
    loaded, _ = model_from_checkpoint(path, model="mae_vit_tiny_patch16", num_heads=2, decoder_num_heads=2)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def plot_logs(*args) -> subprocess.CompletedProcess:
    """Run the plot_logs.py command line."""
    cmd = [sys.executable, str(ROOT / "plot_logs.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def write_log(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(x) for x in records) + "\n" + tail)
    return path


def panel_has(img, k, n_panels, rgb):
    """Whether panel k of n_panels side by side has a pixel of colour rgb."""
    width = img.shape[1] // n_panels
    return bool((img[:, k * width : (k + 1) * width, :3] == rgb).all(axis=-1).any())


TAB_BLUE, TAB_ORANGE, TAB_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)


def test_plot_logs_cli(tmp_path):
    """Default panels (loss, lr, accuracy) of one log; --panel of two runs; a curve in each panel."""
    lines = [dict(epoch=e, train_loss=2.0 / (e + 1), train_lr=1e-3 * min(1, (e + 1) / 3)) for e in range(10)]
    lines += [dict(epoch=e, test_acc1=10.0 * e, test_loss=1.0 / (e + 1)) for e in range(0, 10, 2)]
    log = write_log(tmp_path / "a" / "log.txt", lines, tail="\nnot json\n")
    proc = plot_logs(log, "-o", tmp_path / "curves.png")
    assert proc.returncode == 0, proc.stderr
    img = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    assert img.shape == (320, 3 * 480, 3)
    assert all(panel_has(img, k, 3, TAB_BLUE) for k in range(3))
    assert panel_has(img, 0, 3, TAB_ORANGE) and not panel_has(img, 1, 3, TAB_ORANGE)  # test_loss; lr alone
    other = write_log(tmp_path / "b" / "log.txt", [dict(epoch=e, train_loss=1.0, test_acc5=50.0) for e in range(3)])
    panels = ["--panel", "train_loss", "--panel", "test_acc1,test_acc5"]
    proc = plot_logs(log, other, "-o", tmp_path / "compare.png", *panels)
    assert proc.returncode == 0, proc.stderr
    img = np.asarray(Image.open(tmp_path / "compare.png").convert("RGB"))
    assert img.shape == (320, 2 * 480, 3)
    assert all(panel_has(img, k, 2, TAB_ORANGE) for k in range(2)) and not panel_has(img, 0, 2, TAB_GREEN)
    assert "wrote" in proc.stdout and "(960x320)" in proc.stdout


@pytest.mark.parametrize("case", ["missing log", "unwritable -o", "nothing to plot"])
def test_plot_logs_errors(tmp_path, case):
    """One 'ERROR:' line naming the file, status 1, no traceback, no image."""
    log = write_log(tmp_path / "log.txt", [dict(epoch=0, train_loss=1.0)])
    out = tmp_path / "curves.png"
    if case == "missing log":
        log = tmp_path / "missing" / "log.txt"
    elif case == "unwritable -o":
        out = tmp_path / "no_such_dir" / "curves.png"
    else:
        log.write_text('{"epoch": 0, "train_loss": NaN}\nnot json\n')
    proc = plot_logs(log, "-o", out)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR:") and "Traceback" not in proc.stderr, proc.stderr
    assert str(out if case == "unwritable -o" else log) in lines[0]
    assert not out.exists()


def test_finetuned_checkpoint_with_namespace_args(tmp_path):
    """Published fine-tuned MAE files store 'args' as an argparse.Namespace: read with weights_only=True."""
    model = tiny("mae_vit_tiny_patch16", in_chans=1, img_size=32)
    args = Namespace(model="vit_tiny_patch16", input_size=32, model_kwargs=TINY_KWARGS, data_path=str(DIGITS))
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "ft.pth")
    loaded, info = model_from_checkpoint(tmp_path / "ft.pth")
    assert info["name"] == "mae_vit_tiny_patch16" and info["args"]["data_path"] == str(DIGITS)
    assert torch.equal(loaded.decoder_pred.weight, model.decoder_pred.weight)


def pretrain(output_dir, *flags):
    """A 2-epoch tiny ChannelMAE pretraining on 32 px crops of the IHC tiles, in this process; -> the epoch losses."""
    argv = ["--device", "cpu", "--epochs", "2", "--warmup_epochs", "1", "--input_size", "32", "--patch_size", "8"]
    argv += ["--batch_size", "32", "--num_workers", "0", "--output_dir", str(output_dir), "--model_kwargs"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([*argv, *TINY_KWARGS, *flags]))
    return [json.loads(line)["train_loss"] for line in (output_dir / "log.txt").read_text().splitlines()]


def test_pretrain_vis_every(tmp_path, one_thread, monkeypatch):
    """--vis_every 1 writes vis/epoch_XXX.png and a TensorBoard image each epoch, and leaves the losses as they are."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(builtins, "print", builtins.print)  # main() wraps print for rank 0; undone afterwards
    with_vis = pretrain(tmp_path / "vis", "--vis_every", "1", "--vis_n", "2")
    without = pretrain(tmp_path / "plain", "--vis_every", "0")
    assert with_vis == without
    assert not (tmp_path / "plain" / "vis").exists()
    pngs = sorted((tmp_path / "vis" / "vis").iterdir())
    assert [p.name for p in pngs] == ["epoch_000.png", "epoch_001.png"]
    height, width = layout_size(2, 6, 32 * auto_scale(32))
    assert all(Image.open(p).size == (width, height) for p in pngs)
    events = EventAccumulator(str(tmp_path / "vis"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("reconstruction")
    assert [(e.step, e.width, e.height) for e in images] == [(1000, width, height), (2000, width, height)]
    assert "vis_masked_mse/DAB" in events.Tags()["scalars"]
