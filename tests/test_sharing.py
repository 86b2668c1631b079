"""Sharing a trained model: export_model.py folders and their round trip, timm, torch.hub, W&B logging."""

import builtins
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import export_model
import extract_features
import main_finetune
import main_pretrain
import models_chamae
import models_folder
import models_vit
import visualize
from models_checkpoint import build_classifier, load_pretrained
from models_flags import resolve_checkpoint_flags
from util.cli import run_main
from util.data.evaluation import eval_dataset
from util.data.stats import normalization_record
from util.errors import CheckpointError
from util.features import encode

ROOT = Path(__file__).resolve().parents[1]
IHC = ROOT / "sample_data" / "ihc"
TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
ENCODER = dict(embed_dim=32, depth=1, num_heads=2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def save_ours(model, path, name, data_path, model_kwargs=TINY, **extra_args):
    """A checkpoint laid out as util.checkpoint.save_model writes it (32 px, patch 8), with the data's statistics."""
    dataset = eval_dataset(Namespace(data_path=str(data_path), input_size=32), "pretrain")
    args = dict(
        model=name,
        input_size=32,
        patch_size=8,
        model_kwargs=[f"{k}={v}" for k, v in model_kwargs.items()],
        data_path=str(data_path),
        normalization=normalization_record(dataset),
        **extra_args,
    )
    torch.save({"model": model.state_dict(), "args": args, "epoch": 4}, path)
    return str(path)


def export(ckpt, out, *flags):
    export_model.main(export_model.get_args_parser().parse_args(["--resume", str(ckpt), "--out", str(out), *flags]))
    return json.loads((Path(out) / "config.json").read_text())


def cli(script, *argv):
    return subprocess.run(
        [sys.executable, script, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )


def test_folder_round_trip_gives_identical_features_and_reconstructions(tmp_path, monkeypatch):
    """Checkpoint -> folder -> extract_features.py and visualize.py: bit-identical outputs."""
    monkeypatch.setattr(builtins, "print", builtins.print)  # main() wraps print for rank 0; undone afterwards
    torch.manual_seed(0)
    model = models_chamae.create_model("chamae_vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, **TINY)
    ckpt = save_ours(model, tmp_path / "ckpt.pth", "chamae_vit_tiny_patch16", IHC, mask_ratio=0.5)
    folder = tmp_path / "model"
    config = export(ckpt, folder, "--channel_names", *"R G B H E DAB".split())
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    record = torch.load(ckpt)["args"]["normalization"]
    assert (config["model"], config["img_size"], config["patch_size"], config["epoch"]) == (
        "chamae_vit_tiny_patch16",
        32,
        8,
        4,
    )
    assert config["decoder"] == dict(
        kind="full", embed_dim=32, depth=1, num_heads=2, norm_pix_loss=False, mask_ratio=0.5
    )
    assert [c["name"] for c in config["channels"]] == ["R", "G", "B", "H", "E", "DAB"]
    assert [c["mean"] for c in config["channels"]] == record["mean"]
    assert [c["std"] for c in config["channels"]] == record["std"]
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    outputs = {}
    for name, source in (("ckpt", ckpt), ("folder", str(folder))):
        out = tmp_path / f"{name}.npz"
        argv = ["--resume", source, "--out", str(out), "--device", "cpu", "--num_workers", "0"]
        torch.manual_seed(0)  # the encoder with nothing masked still shuffles its tokens (random_masking)
        extract_features.main(extract_features.get_args_parser().parse_args(argv))
        argv = ["--resume", source, "--out", str(tmp_path / f"{name}.png"), "--n", "2", "--device", "cpu"]
        grid, mse = visualize.main(visualize.get_args_parser().parse_args(argv))
        outputs[name] = dict(np.load(out)), grid, mse
    (ckpt_z, ckpt_grid, ckpt_mse), (folder_z, folder_grid, folder_mse) = outputs["ckpt"], outputs["folder"]
    for key in ("features", "channel_features", "paths", "channel_ids"):
        assert np.array_equal(ckpt_z[key], folder_z[key]), key
    assert np.array_equal(ckpt_grid, folder_grid) and ckpt_mse == folder_mse


def test_eval_and_finetune_accept_a_folder(tmp_path, digits_subset, monkeypatch):
    """--eval --resume DIR scores exactly as the checkpoint; --finetune DIR builds the same classifier."""
    monkeypatch.setattr(builtins, "print", builtins.print)
    data = digits_subset(2, 3)
    torch.manual_seed(0)
    classifier = models_vit.create_model(
        "channelvit_tiny_patch16", img_size=32, patch_size=8, in_chans=1, num_classes=10, global_pool=True, **ENCODER
    )
    ckpt = save_ours(classifier, tmp_path / "ft.pth", "channelvit_tiny_patch16", data, ENCODER, global_pool=True)
    config = export(ckpt, tmp_path / "ft")
    assert (config["head"], config["num_classes"], config["global_pool"]) == ("linear", 10, True)
    stats = []
    for source in (ckpt, tmp_path / "ft"):
        argv = ["--eval", "--resume", str(source), "--device", "cpu", "--num_workers", "0", "--output_dir", ""]
        stats.append(main_finetune.main(main_finetune.get_args_parser().parse_args(argv)))
    assert stats[0] == stats[1] and stats[0]["n"] == 30

    pretrain = models_chamae.create_model("chamae_vit_tiny_patch16", img_size=32, patch_size=8, in_chans=1, **TINY)
    ckpt = save_ours(pretrain, tmp_path / "pre.pth", "chamae_vit_tiny_patch16", data)
    export(ckpt, tmp_path / "pre")
    built = []
    for source in (ckpt, tmp_path / "pre"):
        args = main_finetune.get_args_parser().parse_args(["--finetune", str(source), "--data_path", str(data)])
        found = resolve_checkpoint_flags(args)
        dataset = eval_dataset(args, "val")
        torch.manual_seed(0)
        args.nb_classes = 10
        rows = len(found.vocabulary)
        net = build_classifier(args, dataset.in_chans, rows, found.reference, global_pool=args.global_pool)
        load_pretrained(net, found.pretrained, args.finetune)
        built.append(net.state_dict())
    assert built[0].keys() == built[1].keys() and all(torch.equal(built[0][k], built[1][k]) for k in built[0])


@pytest.mark.parametrize("global_pool", [False, True])
def test_timm_loads_an_exported_vit(tmp_path, global_pool):
    """A vit_* export loads into plain timm (strictly: every key, none missing) and computes the same features."""
    torch.manual_seed(0)
    if global_pool:  # a fine-tuned ViT with its head
        model = models_vit.create_model(
            "vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, num_classes=5, global_pool=True, **ENCODER
        )
        ckpt = save_ours(model, tmp_path / "ft.pth", "vit_tiny_patch16", IHC, ENCODER, global_pool=True)
        config = export(ckpt, tmp_path / "model", "--no_training_args")
        assert config["training_args"] is None
    else:  # an MAE encoder, exported without its decoder
        model = models_chamae.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, **TINY)
        ckpt = save_ours(model, tmp_path / "mae.pth", "mae_vit_tiny_patch16", IHC)
        config = export(ckpt, tmp_path / "model", "--no_decoder")
    assert config["model"] == "vit_tiny_patch16" and config["architecture"] == "vit_tiny_patch16_224"
    weights = tmp_path / "model" / "model.safetensors"
    overlay = dict(file=str(weights), num_classes=config["num_classes"])  # same head size: timm loads strictly
    kwargs = config["model_args"]
    net = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    from_dir = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True)  # timm reads config.json itself
    saved = load_file(weights)
    for loaded in (net, from_dir):
        assert loaded.state_dict().keys() == saved.keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    ours = models_folder.load(str(tmp_path / "model")).eval()
    imgs = torch.randn(3, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval().forward_features(imgs), ours.forward_features(imgs))
        if global_pool:
            assert torch.equal(net(imgs), model.eval()(imgs))
        else:  # the MAE's own encoder, nothing masked, gives the same class token
            cls, _ = encode(model.eval(), imgs, torch.arange(6), "cls")
            assert torch.allclose(net.forward_features(imgs)[:, 0], cls, atol=1e-5)


def hub(name, **kwargs):
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


def test_torch_hub_entry_points_load_folders_and_files(tmp_path):
    sizes = dict(img_size=32, patch_size=8, in_chans=2, **TINY)
    for name, cls in (
        ("mae_vit_tiny_patch16", "MaskedAutoencoderViT"),
        ("chamae_vit_tiny_patch16", "ChannelMaskedAutoencoderViT"),
        ("vit_small_patch16", "VisionTransformer"),
        ("channelvit_base_patch16", "ChannelVisionTransformer"),
    ):
        kwargs = sizes if name.startswith(("mae", "chamae")) else dict(sizes, **ENCODER)
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("decoder") or "mae" in name}
        assert type(hub(name, **kwargs)).__name__ == cls
    torch.manual_seed(0)
    chamae = models_chamae.create_model("chamae_vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, **TINY)
    export(save_ours(chamae, tmp_path / "pre.pth", "chamae_vit_tiny_patch16", IHC), tmp_path / "pre")
    loaded = hub("chamae_vit_tiny_patch16", weights=str(tmp_path / "pre"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in chamae.state_dict().items())
    encoder = hub("channelvit_base_patch16", weights=str(tmp_path / "pre"))  # the size comes from the folder
    assert type(encoder).__name__ == "ChannelVisionTransformer" and encoder.num_classes == 0
    assert torch.equal(encoder.channel_embed, chamae.channel_embed)

    probe = models_vit.create_model("vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, num_classes=3, **ENCODER)
    probe.head = models_vit.probe_head(probe.head)
    probe.head[0].running_mean.normal_()
    ckpt = save_ours(probe, tmp_path / "probe.pth", "vit_tiny_patch16", IHC, ENCODER, global_pool=False)
    imgs = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(hub("vit_tiny_patch16", weights=ckpt)(imgs), probe.eval()(imgs))
    published = tmp_path / "mae_pretrain_vit_tiny.pth"
    mae = models_chamae.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, in_chans=3, **TINY)
    torch.save({"model": mae.state_dict()}, published)
    loaded = hub("mae_vit_tiny_patch16", weights=str(published), num_heads=2, decoder_num_heads=2)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in mae.state_dict().items())
    with pytest.raises(CheckpointError, match="not a model of the vit_\\* family"):
        hub("vit_tiny_patch16", weights=str(tmp_path / "pre"))
    export(ckpt, tmp_path / "probe")
    with pytest.raises(CheckpointError, match="holds no decoder"):
        hub("mae_vit_tiny_patch16", weights=str(tmp_path / "probe"))


def test_bad_folders_and_flags_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("export_model.py", "--resume", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ERROR: ") and "without config.json" in proc.stderr
    model = models_vit.create_model("vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, **ENCODER)
    export(save_ours(model, tmp_path / "vit.pth", "vit_tiny_patch16", IHC, ENCODER), tmp_path / "vit")
    weights = tmp_path / "vit" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = ["--resume", str(tmp_path / "vit"), "--out", str(tmp_path / "f.npz"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:  # run_main's exit, in-process (a subprocess costs seconds)
        run_main(extract_features.main, extract_features.get_args_parser().parse_args(argv))
    assert str(exit_info.value.code).startswith(f"ERROR: cannot read {weights}")
    with pytest.raises(CheckpointError, match="2 channel names given for a model with 6"):
        export(tmp_path / "vit.pth", tmp_path / "again", "--channel_names", "a", "b")


def wandb_history(run_dir) -> list[dict]:
    """The rows logged to an offline W&B run: its run-*.wandb file is a LevelDB-style log of protobuf records
    (a 7-byte header, then 32 KiB blocks of records with a 7-byte header each: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            chunk = b""
    return rows


def test_wandb_offline_gets_the_tensorboard_scalars_and_images(tmp_path, digits_subset, monkeypatch, one_thread):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(builtins, "print", builtins.print)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    argv = ["--data_path", str(digits_subset(2, 1)), "--input_size", "32", "--patch_size", "8", "--epochs", "1"]
    argv += ["--batch_size", "5", "--num_workers", "0", "--device", "cpu", "--output_dir", str(out), "--print_freq"]
    argv += ["1", "--vis_every", "1", "--vis_n", "2", "--wandb", "tests", "--wandb_name", "tiny", "--model_kwargs"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([*argv, *[f"{k}={v}" for k, v in TINY.items()]]))
    events = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tensorboard = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert {"train_loss", "lr", "vis_masked_mse/ch0"} <= {tag for tag, _ in tensorboard} and len(tensorboard) > 8
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    rows = wandb_history(run_dir)
    scalars = {
        (tag, row["global_step"]): value
        for row in rows
        for tag, value in row.items()
        if not tag.startswith(("_", "global_step", "reconstruction/"))
    }
    assert scalars.keys() == tensorboard.keys()
    assert all(np.isclose(scalars[key], value, rtol=1e-6) for key, value in tensorboard.items())
    (image,) = [row["reconstruction/path"] for row in rows if "reconstruction/path" in row]
    logged_png = np.asarray(Image.open(run_dir / "files" / image).convert("RGB"))
    assert np.array_equal(logged_png, np.asarray(Image.open(out / "vis" / "epoch_000.png").convert("RGB")))


def test_wandb_flag_without_the_package_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(builtins, "print", builtins.print)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError, as when not installed
    argv = ["--wandb", "proj", "--output_dir", str(tmp_path / "run"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(main_pretrain.main, main_pretrain.get_args_parser().parse_args(argv))
    message = str(exit_info.value.code)
    assert message.startswith("ERROR: --wandb proj needs the wandb package") and "pip install wandb" in message
    assert not (tmp_path / "run").exists()
