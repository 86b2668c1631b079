"""Data layer: readers, layouts, channel selection, statistics, normalisation, transforms, errors, sample data."""

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import models_chamae
from util.cli import add_common_args
from util.data import readers
from util.data import stats as data_stats
from util.data.builders import build_dataset, build_pretrain_dataset
from util.data.errors import CorruptFileError, DatasetError, MissingPathError, NonFinitePixelsError
from util.data.evaluation import inherit_data_args
from util.data.readers import read_header, read_image
from util.data.stats import compute_channel_stats, write_channel_stats
from util.data.transforms import build_transform

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


def stack(c=4, h=12, w=10, seed=0, high=65535):
    """(C, H, W) uint16 with values well above 255."""
    return np.random.default_rng(seed).integers(0, high, (c, h, w), dtype=np.uint16)


def args(data_path, **kwargs):
    return Namespace(data_path=str(data_path), input_size=16, **kwargs)


def tiff_folder(root, n=6, c=4, h=12, w=10):
    """root/sNN.tif files of (C, H, W) uint16, one page per channel; returns the arrays."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = [stack(c, h, w, seed=i) for i in range(n)]
    for i, a in enumerate(arrays):
        tifffile.imwrite(root / f"s{i:02d}.tif", a, photometric="minisblack")
    return arrays


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("layout", ["hw", "chw", "hwc", "rgb_planar", "rgb_contig"])
def test_tiff_16bit_layouts_round_trip(tmp_path, layout):
    a = stack(3 if layout.startswith("rgb") else 5, 20, 24)
    stored = a[0] if layout == "hw" else a.transpose(1, 2, 0) if layout in ("hwc", "rgb_contig") else a
    kwargs = {"photometric": "rgb", "planarconfig": "separate"} if layout == "rgb_planar" else {}
    kwargs = {"photometric": "rgb"} if layout == "rgb_contig" else kwargs
    tifffile.imwrite(tmp_path / "x.tif", stored, **kwargs)
    expected = a[:1] if layout == "hw" else a
    img = read_image(tmp_path / "x.tif")
    assert img.dtype == np.float32 and img.max() > 255
    np.testing.assert_array_equal(img, expected)
    assert read_header(tmp_path / "x.tif").shape == expected.shape


def test_npy_and_layout_rule(tmp_path):
    a = np.random.default_rng(0).normal(size=(3, 9, 11)).astype(np.float32)
    np.save(tmp_path / "chw.npy", a)
    np.save(tmp_path / "hwc.npy", a.transpose(1, 2, 0))
    np.save(tmp_path / "squeezed.npy", a[None, None])
    for name in ("chw", "hwc", "squeezed"):
        np.testing.assert_array_equal(read_image(tmp_path / f"{name}.npy"), a)
        assert read_header(tmp_path / f"{name}.npy").shape == (3, 9, 11)
    np.save(tmp_path / "ambiguous.npy", np.zeros((100, 3, 100), np.float32))
    with pytest.raises(DatasetError, match="ambiguous.npy.*channel axis"):
        read_image(tmp_path / "ambiguous.npy")


def write_array(path, a):
    """a as a .npy or a multi-page .tif (one page per leading index), by path's suffix."""
    if path.suffix == ".npy":
        np.save(path, a)
    else:
        tifffile.imwrite(path, a, photometric="minisblack")


@pytest.mark.parametrize("suffix", [".npy", ".tif"])
def test_200_band_arrays_read_the_right_way_round(tmp_path, suffix):
    """Hyperspectral cubes of 200 bands, stored channels-first or channels-last, become (200, 64, 64) samples."""
    cube = stack(200, 64, 64)
    write_array(tmp_path / f"first{suffix}", cube)
    write_array(tmp_path / f"last{suffix}", cube.transpose(1, 2, 0))
    ds = build_pretrain_dataset(args(tmp_path, mean=[0] * 200, std=[1] * 200))
    assert (ds.in_chans, ds.num_channels, len(ds)) == (200, 200, 2)
    for i in range(2):
        np.testing.assert_array_equal(ds.load_raw(i), cube)
    img, _ = ds[0]
    assert img.shape == (200, 16, 16)
    model = models_chamae.create_model(
        "chamae_vit_tiny_patch16", img_size=16, patch_size=8, in_chans=200, embed_dim=32, depth=1, num_heads=2,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    )  # fmt: skip
    loss, pred, mask = model(torch.stack([ds[0][0], ds[1][0]]), 0.75, torch.as_tensor(ds.channel_ids))
    assert pred.shape == (2, 200 * 4, 64) and mask.shape == (2, 800) and torch.isfinite(loss)


@pytest.mark.parametrize("shape", [(64, 64, 64), (3, 64, 3), (30, 40, 50)])
@pytest.mark.parametrize("suffix", [".npy", ".tif"])
def test_ambiguous_channel_axis_needs_the_flag(tmp_path, shape, suffix):
    a = stack(*shape)
    write_array(tmp_path / f"cube{suffix}", a)
    with pytest.raises(DatasetError) as error:
        build_pretrain_dataset(args(tmp_path))
    assert f"cube{suffix}: cannot tell the channel axis of shape {shape}" in str(error.value)
    assert "--channel_axis first for (C, H, W) or --channel_axis last for (H, W, C)" in str(error.value)
    first = build_pretrain_dataset(args(tmp_path, channel_axis="first"))
    last = build_pretrain_dataset(args(tmp_path, channel_axis="last"))
    np.testing.assert_array_equal(first.load_raw(0), a)
    np.testing.assert_array_equal(last.load_raw(0), a.transpose(2, 0, 1))
    assert (first.in_chans, last.in_chans) == (shape[0], shape[2])


def stats_cli(*argv):
    """``python -m util.data.stats ARGV`` in this process -> 0 or its ``ERROR: ...`` exit message."""
    try:
        data_stats.main([*map(str, argv)])
    except SystemExit as exit:
        return exit.code
    return 0


def test_channel_axis_in_the_stats_tool(tmp_path):
    a = stack(64, 64, 64)
    np.save(tmp_path / "cube.npy", a)
    flags = ["--data_path", tmp_path, "--out", tmp_path / "stats.json"]
    code = stats_cli(*flags)
    assert code.startswith(f"ERROR: {tmp_path / 'cube.npy'}: cannot tell the channel axis of shape (64, 64, 64)")
    assert "--channel_axis last" in code and not (tmp_path / "stats.json").exists()
    assert stats_cli(*flags, "--channel_axis", "last") == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    np.testing.assert_allclose(stats["mean"], a.mean(axis=(0, 1)), rtol=1e-9)


@pytest.mark.parametrize("script", ["main_pretrain", "main_finetune", "main_linprobe", "visualize", "extract_features"])
def test_every_tool_takes_the_reading_flags(script):
    """--channel_axis and --nan_fill on every script that reads data; the evaluation tools inherit them from the
    checkpoint they read, like the other data flags."""
    parser = importlib.import_module(script).get_args_parser()
    parsed = parser.parse_args(["--resume", "ckpt.pth", "--channel_axis", "last", "--nan_fill", "-1"])
    assert (parsed.channel_axis, parsed.nan_fill) == ("last", -1.0)
    if script in ("visualize", "extract_features"):
        unset = parser.parse_args(["--resume", "ckpt.pth", "--data_path", "data"])
        model = Namespace(patch_embed=Namespace(img_size=(32, 32)))
        inherit_data_args(unset, {"channel_axis": "first", "nan_fill": 0.0}, model)
        assert (unset.channel_axis, unset.nan_fill) == ("first", 0.0)


def test_png_gray_rgb_and_16bit(tmp_path):
    gray = np.arange(24 * 16, dtype=np.uint8).reshape(24, 16)
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    gray16 = (np.arange(24 * 16, dtype=np.uint16) * 150).reshape(24, 16)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png"), gray[None])
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(read_image(tmp_path / "gray16.png"), gray16[None])
    assert read_image(tmp_path / "gray16.png").max() > 255
    assert read_header(tmp_path / "rgb.png") == readers.Header((3, 10, 12), np.dtype("uint8"))
    assert read_header(tmp_path / "gray16.png").dtype == np.uint16


def test_png_16bit_colour_keeps_range(tmp_path):
    imagecodecs = pytest.importorskip("imagecodecs")
    rgb16 = stack(3, 8, 9).transpose(1, 2, 0).copy()
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png"), rgb16.transpose(2, 0, 1))
    assert read_header(tmp_path / "rgb16.png") == readers.Header((3, 8, 9), np.dtype("uint16"))


def test_jpeg(tmp_path):
    Image.fromarray(np.full((16, 20, 3), 128, np.uint8)).save(tmp_path / "x.jpg")
    img = read_image(tmp_path / "x.jpg")
    assert img.shape == (3, 16, 20) and abs(float(img.mean()) - 128) < 2


# ---------------------------------------------------------------------------------------------- layouts


def test_per_channel_csv_and_channel_selection(tmp_path):
    arrays = [stack(3, 12, 10, seed=i) for i in range(4)]
    lines = ["dna,rna,actin,label"]
    for i, a in enumerate(arrays):
        (tmp_path / "plate").mkdir(exist_ok=True)
        for c, name in enumerate(("dna", "rna", "actin")):
            tifffile.imwrite(tmp_path / "plate" / f"w{i}_{name}.tif", a[c])
        lines.append(f"plate/w{i}_dna.tif,plate/w{i}_rna.tif,plate/w{i}_actin.tif,{['a', 'b'][i % 2]}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(lines[:3]) + "\n")
    ds = build_dataset(True, args(tmp_path, mean=[0] * 3, std=[1] * 3))
    assert (ds.in_chans, ds.channel_ids, ds.classes, ds.nb_classes) == (3, [0, 1, 2], ["a", "b"], 2)
    assert ds.channel_names == ["dna", "rna", "actin"] and [label for _, label in ds.samples] == [0, 1, 0, 1]
    np.testing.assert_array_equal(ds.load_raw(2), arrays[2])
    picked = build_dataset(False, args(tmp_path, channels="2,0", mean=[0] * 3, std=[1] * 3))
    assert (picked.in_chans, picked.channel_ids, len(picked)) == (2, [2, 0], 2)
    np.testing.assert_array_equal(picked.load_raw(1), arrays[1][[2, 0]])
    img, label = picked[1]
    assert img.shape == (2, 16, 16) and label == 1


def test_channel_selection_on_multichannel_files(tmp_path):
    arrays = tiff_folder(tmp_path / "data", c=5)
    ds = build_pretrain_dataset(args(tmp_path / "data", channels=[4, 1], mean=[0] * 5, std=[1] * 5))
    assert ds.channel_ids == [4, 1] and ds.in_chans == 2 and ds.num_channels == 5
    np.testing.assert_array_equal(ds.load_raw(3), arrays[3][[4, 1]])
    img, label = ds[3]
    assert img.shape == (2, 16, 16) and img.dtype == torch.float32 and label == -1


def test_class_folders_and_pretrain_uses_train(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            tiff_folder(tmp_path / split / cls, n=n)
    train = build_dataset(True, args(tmp_path))
    val = build_dataset(False, args(tmp_path))
    assert (len(train), len(val), train.classes, val.classes) == (6, 4, ["cat", "dog"], ["cat", "dog"])
    assert sorted({label for _, label in val.samples}) == [0, 1]
    pretrain = build_pretrain_dataset(args(tmp_path))
    assert len(pretrain) == 6 and pretrain.classes == [] and pretrain[0][1] == -1


def test_csv_path_column_relative_paths(tmp_path):
    arrays = tiff_folder(tmp_path / "tiles", n=3)
    (tmp_path / "index.csv").write_text("path,label\n" + "".join(f"tiles/s{i:02d}.tif,{i}\n" for i in range(3)))
    ds = build_pretrain_dataset(args(tmp_path / "index.csv"))
    assert len(ds) == 3 and all(label == -1 for _, label in ds.samples)
    np.testing.assert_array_equal(ds.load_raw(1), arrays[1])


def test_symlink_loops_are_followed_once(tmp_path):
    """8 files; links back up the tree (one loop, then two) and a second link to a folder add no samples."""
    root = tmp_path / "data"
    for folder, count in (("", 2), ("a", 2), ("a/deep", 2), ("b", 2)):
        tiff_folder(root / folder, n=count, c=1)
    (root / "a" / "deep" / "up").symlink_to(root, target_is_directory=True)
    one_loop = build_pretrain_dataset(args(root, mean=[0], std=[1]))
    assert len(one_loop) == 8 and len({os.path.realpath(p) for p, _ in one_loop.samples}) == 8
    (root / "b" / "up").symlink_to("..", target_is_directory=True)
    (root / "also_a").symlink_to(root / "a", target_is_directory=True)
    two_loops = build_pretrain_dataset(args(root, mean=[0], std=[1]))
    assert sorted(p for p, _ in two_loops.samples) == sorted(p for p, _ in one_loop.samples)


# ---------------------------------------------------------------------------------------------- statistics


def concat_pixels(arrays):
    return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1).astype(np.float64)


def test_stats_uint16_exact(tmp_path):
    arrays = tiff_folder(tmp_path, n=5, c=3, h=17, w=13)
    stats = write_channel_stats(tmp_path)
    pixels = concat_pixels(arrays)
    np.testing.assert_allclose(stats["mean"], pixels.mean(1), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.std(1), rtol=1e-6)
    np.testing.assert_allclose(stats["p1"], np.percentile(pixels, 1, axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats["p99"], np.percentile(pixels, 99, axis=1), rtol=1e-9)
    assert stats["num_samples"] == 5 and "exact" in stats["percentile_method"]
    assert json.loads((tmp_path / "channel_stats.json").read_text())["mean"] == stats["mean"]


def test_stats_float_subsample(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    arrays = [rng.normal(100 + 10 * c, 5, (2, 40, 40)).astype(np.float32) for c in range(8)]
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"s{i}.npy", a)
    pixels = concat_pixels(arrays)
    exact = write_channel_stats(tmp_path)
    np.testing.assert_allclose(exact["p99"], np.percentile(pixels, 99, axis=1), rtol=1e-6)
    monkeypatch.setattr(data_stats, "PERCENTILE_SAMPLE_SIZE", 4000)
    sampled = write_channel_stats(tmp_path)
    np.testing.assert_allclose(sampled["mean"], pixels.mean(1), rtol=1e-6)
    np.testing.assert_allclose(sampled["std"], pixels.std(1), rtol=1e-6)
    for q in (1, 99):
        level = (pixels < np.array(sampled[f"p{q}"])[:, None]).mean(1) * 100
        np.testing.assert_allclose(level, q, atol=1.0)


def test_stats_cli(tmp_path):
    tiff_folder(tmp_path / "data" / "train", n=3, c=2)
    out = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "util.data.stats", "--data_path", str(tmp_path / "data"), "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert len(json.loads(out.read_text())["std"]) == 2


def test_nan_pixels_are_named_filled_or_skipped(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(2, 8, 8)).astype(np.float32) for _ in range(4)]
    arrays[1][0, 2, 3] = np.nan
    arrays[3][1, 0, :2] = np.inf, -np.inf
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"s{i}.npy", a)
    assert stats_cli("--data_path", tmp_path) == (
        "ERROR: 2 of 4 samples have NaN or infinite pixels, so their statistics would be NaN: "
        f"{tmp_path / 's1.npy'} has 1 NaN or infinite pixel values (of 128); "
        f"{tmp_path / 's3.npy'} has 2 NaN or infinite pixel values (of 128). "
        "Pass --nan_fill VALUE to replace those pixels, or --skip_bad_samples to leave the samples out"
    )
    assert not (tmp_path / "channel_stats.json").exists()
    with pytest.raises(NonFinitePixelsError, match="2 of 4 samples"):
        build_pretrain_dataset(args(tmp_path))  # no --mean/--std: the estimate reads them all

    assert stats_cli("--data_path", tmp_path, "--nan_fill", "0") == 0
    filled = [np.nan_to_num(a, nan=0, posinf=0, neginf=0) for a in arrays]
    stats = json.loads((tmp_path / "channel_stats.json").read_text())
    np.testing.assert_allclose(stats["mean"], concat_pixels(filled).mean(1), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], concat_pixels(filled).std(1), rtol=1e-6)

    strict = build_pretrain_dataset(args(tmp_path, mean=[0, 0], std=[1, 1]))
    with pytest.raises(NonFinitePixelsError, match=r"s1.npy has 1 NaN or infinite pixel values \(of 128\); pass --nan"):
        strict[1]
    np.testing.assert_array_equal(strict.load_raw(0), arrays[0])
    with pytest.raises(NonFinitePixelsError, match="s3.npy has 2"):
        strict[3]
    only_first = build_pretrain_dataset(args(tmp_path, channels="0", mean=[0], std=[1]))
    np.testing.assert_array_equal(only_first.load_raw(3), arrays[3][:1])  # the channels not read are not checked
    filled_ds = build_pretrain_dataset(args(tmp_path, mean=[0, 0], std=[1, 1], nan_fill=-1))
    np.testing.assert_array_equal(filled_ds.load_raw(1), np.nan_to_num(arrays[1], nan=-1))
    skipping = build_pretrain_dataset(args(tmp_path, mean=[0, 0], std=[1, 1], skip_bad_samples=True))
    img, _ = skipping[1]
    assert torch.isfinite(img).all() and skipping.num_skipped == 1


# ---------------------------------------------------------------------------------------------- normalisation


def normalize_of(ds):
    return ds.transform.transforms[-1]


def test_normalisation_policy(tmp_path, caplog):
    tiff_folder(tmp_path, n=4, c=3)
    with caplog.at_level(logging.WARNING, logger="util.data"):
        estimated = build_pretrain_dataset(args(tmp_path))
    assert "estimated from 4 of 4" in caplog.text
    exact = compute_channel_stats(build_pretrain_dataset(args(tmp_path, mean=[0] * 3, std=[1] * 3)), percentiles=False)
    np.testing.assert_allclose(normalize_of(estimated).mean, exact["mean"], rtol=1e-6)
    (tmp_path / "channel_stats.json").write_text(json.dumps({"mean": [1, 2, 3], "std": [4, 5, 6]}))
    from_file = build_pretrain_dataset(args(tmp_path, channels="2,0"))
    assert normalize_of(from_file).mean == [3, 1] and normalize_of(from_file).std == [6, 4]
    flags = build_pretrain_dataset(args(tmp_path, mean="7,8,9", std="1,1,1"))
    assert normalize_of(flags).mean == [7, 8, 9]


def test_mean_std_order_with_reordered_channels(tmp_path):
    """--mean/--std hold file order when --channels reorders every channel and --channels order for a subset,
    as --help says; each plane is normalised with its own channel's values (constant planes 0, 100, 300)."""
    planes = np.stack([np.full((16, 16), v, dtype=np.uint16) for v in (0, 100, 300)])
    for i in range(2):
        tifffile.imwrite(tmp_path / f"s{i}.tif", planes, photometric="minisblack")
    reordered = build_pretrain_dataset(args(tmp_path, channels="2,0,1", mean=[0, 100, 300], std=[1, 2, 3]))
    assert (normalize_of(reordered).mean, normalize_of(reordered).std) == ([300, 0, 100], [3, 1, 2])
    subset = build_pretrain_dataset(args(tmp_path, channels="2,0", mean=[300, 0], std=[3, 1]))
    assert (normalize_of(subset).mean, normalize_of(subset).std) == ([300, 0], [3, 1])
    for ds in (reordered, subset):
        torch.testing.assert_close(ds[0][0], torch.zeros(ds.in_chans, 16, 16), atol=1e-4, rtol=0)
    helps = [a.help for a in add_common_args(argparse.ArgumentParser())._actions if a.dest in ("mean", "std")]
    assert len(helps) == 2
    for text in helps:
        assert "in file order also when --channels reorders them" in text
        assert "one per --channels id, in --channels order, when --channels picks fewer channels" in text


def test_imagenet_default_and_timm_rgb_path(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    rgb_args = args(tmp_path, aa="rand-m9-mstd0.5-inc1", color_jitter=None, reprob=0.25, remode="pixel", recount=1)
    train = build_dataset(True, rgb_args)
    assert "RandAugment" in repr(train.transform) and "RandomErasing" in repr(train.transform)
    img, _ = train[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    val = build_dataset(False, rgb_args)
    np.testing.assert_allclose(normalize_of(val).mean, [0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert val[0][0].shape == (3, 16, 16)


def test_three_8bit_bands_are_not_taken_for_rgb(tmp_path, caplog):
    """3-band 8-bit arrays without statistics: estimated mean/std, crops and flips, and a warning; the RGB recipe
    (ImageNet mean/std, RandAugment) once channels.txt names them R, G, B; a checkpoint's recorded statistics first."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                np.save(tmp_path / split / cls / f"{i}.npy", rng.integers(0, 256, (3, 40, 36), dtype=np.uint8))
    rgb_args = args(tmp_path, aa="rand-m9-mstd0.5-inc1", color_jitter=None, reprob=0.25, remode="pixel", recount=1)
    with caplog.at_level(logging.WARNING, logger="util.data"):
        bands = build_dataset(True, rgb_args)
    assert "RandAugment" not in repr(bands.transform) and "RandomResizedCrop" in repr(bands.transform)
    assert bands.norm_source == "mean/std estimated from training samples"
    assert "3 8-bit channels that are not RGB images" in caplog.text and "estimated from 4 of 4" in caplog.text

    (tmp_path / "channels.txt").write_text("R\nG\nB\n")
    declared = build_dataset(True, rgb_args)
    assert "RandAugment" in repr(declared.transform) and declared.norm_source == "ImageNet mean/std (8-bit RGB images)"

    record = dict(num_channels=3, channels=[0, 1, 2], dtypes=["uint8"], mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0])
    from_checkpoint = build_dataset(False, args(tmp_path, channels="2,0"), checkpoint_stats=record)
    assert normalize_of(from_checkpoint).mean == [3.0, 1.0] and normalize_of(from_checkpoint).std == [6.0, 4.0]
    assert from_checkpoint.norm_source == "the checkpoint's statistics"
    for other_data in ({**record, "dtypes": ["uint16"]}, {**record, "num_channels": 4}):
        assert build_dataset(False, args(tmp_path), checkpoint_stats=other_data).norm_source.startswith("ImageNet")
    (tmp_path / "channel_stats.json").write_text(json.dumps({"mean": [7, 8, 9], "std": [1, 1, 1]}))
    assert normalize_of(build_dataset(False, args(tmp_path), checkpoint_stats=record)).mean == [7, 8, 9]


@pytest.mark.parametrize("channels", [1, 5, 8])
@pytest.mark.parametrize("mode", ["pretrain", "train", "eval"])
def test_transforms_any_channel_count(channels, mode):
    a = Namespace(input_size=24, mean=[10.0] * channels, std=[2.0] * channels)
    transform = build_transform(mode != "eval", a, pretrain=mode == "pretrain")
    out = transform(torch.rand(channels, 40, 30) * 1000)
    assert out.shape == (channels, 24, 24) and out.dtype == torch.float32


def test_scale_and_hflip_flags():
    """--scale 1 1 with --hflip 0 leaves only the resize: the training transform becomes deterministic."""
    x = torch.rand(2, 24, 24) * 1000
    plain = Namespace(input_size=24, mean=[0.0, 0.0], std=[1.0, 1.0])
    fixed = Namespace(**vars(plain), scale=[1.0, 1.0], hflip=0.0)
    torch.manual_seed(0)
    assert not all(torch.equal(build_transform(True, plain)(x), x) for _ in range(8))
    assert all(torch.equal(build_transform(True, fixed)(x), x) for _ in range(8))
    with pytest.raises(DatasetError, match="--scale 0.5 0.2"):
        build_transform(True, Namespace(**vars(plain), scale=[0.5, 0.2]))


# ---------------------------------------------------------------------------------------------- errors


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path .*nowhere"):
        build_pretrain_dataset(args(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty.*no readable image files"):
        build_pretrain_dataset(args(tmp_path / "empty"))
    with pytest.raises(MissingPathError, match="val"):
        tiff_folder(tmp_path / "only_train" / "train" / "a", n=1)
        build_dataset(False, args(tmp_path / "only_train"))


def test_csv_row_with_missing_file(tmp_path):
    tiff_folder(tmp_path, n=1)
    (tmp_path / "train.csv").write_text("path,label\ns00.tif,0\ngone.tif,1\n")
    with pytest.raises(MissingPathError, match=r"train.csv line 3: column 'path' names .*gone.tif"):
        build_dataset(True, args(tmp_path))


@pytest.mark.parametrize("suffix", [".tif", ".png", ".npy"])
def test_corrupt_and_truncated_files_named(tmp_path, suffix):
    tiff_folder(tmp_path, n=2, c=1)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(CorruptFileError, match=f"bad\\{suffix}"):
        build_pretrain_dataset(args(tmp_path))
    if suffix == ".tif":
        tifffile.imwrite(bad, stack(1, 12, 10)[0])
    elif suffix == ".png":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10), dtype=np.uint8)).save(bad)
    else:
        np.save(bad, stack(1, 12, 10))
    truncate(bad)
    with pytest.raises(CorruptFileError, match=f"bad\\{suffix} is truncated"):
        build_pretrain_dataset(args(tmp_path))


def test_mismatched_channels_size_and_in_chans(tmp_path):
    tiff_folder(tmp_path / "c", n=2, c=4)
    tifffile.imwrite(tmp_path / "c" / "z_odd.tif", stack(3), photometric="minisblack")
    with pytest.raises(DatasetError, match="z_odd.tif has 3 channels"):
        build_pretrain_dataset(args(tmp_path / "c"))
    tiff_folder(tmp_path / "s", n=2, c=4)
    tifffile.imwrite(tmp_path / "s" / "z_big.tif", stack(4, 30, 30), photometric="minisblack")
    with pytest.raises(DatasetError, match="z_big.tif is 30x30.*--allow_mixed_sizes"):
        build_pretrain_dataset(args(tmp_path / "s"))
    assert len(build_pretrain_dataset(args(tmp_path / "s", allow_mixed_sizes=True))) == 3
    with pytest.raises(DatasetError, match="--in_chans 3"):
        build_pretrain_dataset(args(tmp_path / "s", in_chans=3, allow_mixed_sizes=True))
    with pytest.raises(DatasetError, match="--channels"):
        build_pretrain_dataset(args(tmp_path / "s", channels="0,9", allow_mixed_sizes=True))


def test_bad_mean_std_flags(tmp_path):
    tiff_folder(tmp_path, n=2, c=4)
    with pytest.raises(DatasetError, match="--mean has 2 values"):
        build_pretrain_dataset(args(tmp_path, mean=[1, 2], std=[1, 2]))
    with pytest.raises(DatasetError, match="--std has 3 values"):
        build_pretrain_dataset(args(tmp_path, mean=[1] * 4, std=[1] * 3))
    with pytest.raises(DatasetError, match="--mean and --std"):
        build_pretrain_dataset(args(tmp_path, mean=[1] * 4))
    with pytest.raises(MissingPathError, match="--channel_stats"):
        build_pretrain_dataset(args(tmp_path, channel_stats=str(tmp_path / "none.json")))


def test_per_channel_csv_rejects_multichannel_file(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", stack(2))
    tifffile.imwrite(tmp_path / "b.tif", stack(1)[0])
    (tmp_path / "index.csv").write_text("ch0,ch1\na.tif,b.tif\n")
    with pytest.raises(DatasetError, match="a.tif has 2 channels"):
        build_pretrain_dataset(args(tmp_path / "index.csv"))


def test_skip_bad_samples(tmp_path):
    tiff_folder(tmp_path, n=3, c=2)
    strict = build_pretrain_dataset(args(tmp_path, mean=[0, 0], std=[1, 1]))
    lenient = build_pretrain_dataset(args(tmp_path, mean=[0, 0], std=[1, 1], skip_bad_samples=True))
    (tmp_path / "s01.tif").write_bytes(b"broken after the dataset was built")
    with pytest.raises(CorruptFileError, match="s01.tif"):
        strict[1]
    img, _ = lenient[1]
    assert img.shape == (2, 16, 16) and lenient.num_skipped == 1
    (tmp_path / "s99.tif").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match="s01.tif"):
        build_pretrain_dataset(args(tmp_path))
    kept = build_pretrain_dataset(args(tmp_path, skip_bad_samples=True))
    assert [Path(p).name for p, _ in kept.samples] == ["s00.tif", "s02.tif"]


# ---------------------------------------------------------------------------------------------- sample data


def test_sample_ihc():
    ds = build_pretrain_dataset(Namespace(data_path=str(SAMPLE / "ihc"), input_size=64))
    assert (len(ds), ds.in_chans, ds.channel_names) == (100, 6, ["R", "G", "B", "H", "E", "DAB"])
    assert ds.dtypes == {"uint16"}
    raw = np.stack([ds.load_raw(i) for i in range(0, 100, 9)])
    assert raw.shape[1:] == (6, 64, 64) and raw.max() > 255
    assert (raw.reshape(raw.shape[0], 6, -1).std(axis=(0, 2)) > 0).all()
    img, label = ds[0]
    assert img.shape == (6, 64, 64) and label == -1 and float(img.std()) > 0.1


def test_sample_digits():
    a = Namespace(data_path=str(SAMPLE / "digits"), input_size=32)
    train, val = build_dataset(True, a), build_dataset(False, a)
    assert (len(train), len(val), train.nb_classes, train.in_chans) == (1437, 360, 10, 1)
    assert train.classes == [str(d) for d in range(10)]
    raw = val.load_raw(0)
    assert raw.shape == (1, 32, 32) and raw.dtype == np.uint8 and raw.std() > 0
    img, label = val[0]
    assert img.shape == (1, 32, 32) and 0 <= label < 10
    stats = json.loads((SAMPLE / "digits" / "channel_stats.json").read_text())
    np.testing.assert_allclose(normalize_of(val).mean, stats["mean"])
