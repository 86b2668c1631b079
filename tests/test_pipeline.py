"""The input pipeline of issue 15: the packed store (exact pixels, labels, names, statistics, resuming), crops cut
from the raw pixels (CPU and device-side), their distribution against torchvision's, and the CLI flags."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy.stats import ks_2samp

import pack_dataset
from util.cli import run_main
from util.data.builders import build_dataset, build_pretrain_dataset
from util.data.config import DataConfig
from util.data.device_augment import WindowCrops, collate_windows, training_items
from util.data.errors import CorruptFileError, DatasetError
from util.data.packed import STORE_FILENAME, PackedRef
from util.fast_paths import adamw_kwargs, enable_fast_paths
from util.loaders import default_num_workers

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def cell_painting(root: Path, sizes=((40, 48), (40, 48), (36, 30)), seed=0) -> Path:
    """A per-channel CSV of 16-bit TIFFs (one file per channel, zlib-compressed and plain, two field sizes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = [",".join(CHANNELS)]
    for i, (h, w) in enumerate(sizes):
        names = []
        for c, channel in enumerate(CHANNELS):
            name = f"s{i}_{channel}.tif"
            pixels = rng.integers(0, 65535, (h, w), dtype=np.uint16)
            tifffile.imwrite(root / name, pixels, compression="zlib" if (i + c) % 2 else None)
            names.append(name)
        rows.append(",".join(names))
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def pack(*argv) -> tuple[int, str, str]:
    """``python pack_dataset.py --no_progress ARGV`` in this process -> (exit status, stdout, its ERROR line)."""
    args = pack_dataset.get_args_parser().parse_args(["--no_progress", *map(str, argv)])
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            run_main(pack_dataset.main, args, errors=(DatasetError,))
    except SystemExit as exit:
        return 1, out.getvalue(), str(exit.code)
    return 0, out.getvalue(), ""


def assert_same_pixels(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a.load_raw(i), b.load_raw(i)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_packed_cell_painting_equals_the_files_and_keeps_names_and_stats(tmp_path):
    src = cell_painting(tmp_path / "src")
    code, out, err = pack("--data_path", src, "--out", tmp_path / "store", "--allow_mixed_sizes")
    assert code == 0, err
    assert "train 3 samples of 5 channels" in out and "in 2 array(s)" in out and "GiB store" in out
    config = dict(allow_mixed_sizes=True)
    original = build_pretrain_dataset(DataConfig(data_path=str(src), **config))
    packed = build_pretrain_dataset(DataConfig(data_path=str(tmp_path / "store"), **config))
    assert all(isinstance(files, PackedRef) for files, _ in packed.samples)
    assert [str(files) for files, _ in packed.samples] == ["|".join(files) for files, _ in original.samples]
    assert_same_pixels(original, packed)
    assert packed.channel_names == CHANNELS
    stats = json.loads((tmp_path / "store" / "channel_stats.json").read_text())
    pixels = [original.load_raw(i).reshape(5, -1) for i in range(3)]
    np.testing.assert_allclose(stats["mean"], np.concatenate(pixels, axis=1).mean(axis=1), rtol=1e-9)
    assert packed.norm_source == str(tmp_path / "store" / "channel_stats.json")


def test_packed_labelled_splits_from_two_sources(tmp_path, digits_subset):
    first, second = digits_subset(2, 1, num_classes=3), digits_subset(1, 1, num_classes=4)
    code, out, err = pack("--data_path", first, second, "--out", tmp_path / "store")
    assert code == 0, err
    assert "train 10, val 7 samples" in out
    for train in (True, False):
        packed = build_dataset(train, DataConfig(data_path=str(tmp_path / "store")))
        a, b = (build_dataset(train, DataConfig(data_path=str(p))) for p in (first, second))
        assert packed.classes == ["0", "1", "2", "3"]
        labels = [a.classes[label] for _, label in a.samples] + [b.classes[label] for _, label in b.samples]
        assert [packed.classes[label] for _, label in packed.samples] == labels
        for i, (source, j) in enumerate([(a, k) for k in range(len(a))] + [(b, k) for k in range(len(b))]):
            np.testing.assert_array_equal(packed.load_raw(i), source.load_raw(j))


def test_packing_resumes_an_interrupted_store_and_refuses_other_data(tmp_path):
    src, store = cell_painting(tmp_path / "src", sizes=((32, 32),) * 4), tmp_path / "store"
    assert pack("--data_path", src, "--out", store)[0] == 0
    manifest = json.loads((store / STORE_FILENAME).read_text())
    manifest["complete"] = False  # as if the process had died after flushing two samples
    (store / STORE_FILENAME).write_text(json.dumps(manifest))
    done = np.load(store / "train-done.npy", mmap_mode="r+")
    done[2:] = 0
    done.flush()
    pixels = np.load(store / "train-000.npy", mmap_mode="r+")
    pixels[2:] = 0
    pixels.flush()
    del done, pixels
    with pytest.raises(DatasetError, match="the packed store is incomplete"):
        build_pretrain_dataset(DataConfig(data_path=str(store)))

    code, out, err = pack("--data_path", src, "--out", store)
    assert code == 0, err
    assert "resumed: 2 samples had been packed before" in out
    original = build_pretrain_dataset(DataConfig(data_path=str(src)))
    assert_same_pixels(original, build_pretrain_dataset(DataConfig(data_path=str(store))))
    assert "complete already; nothing to do" in pack("--data_path", src, "--out", store)[1]

    with pytest.raises(DatasetError, match=f"--data_path {store}: the packed store has no val split"):
        build_dataset(False, DataConfig(data_path=str(store)))
    (store / "train-sources.json").unlink()
    with pytest.raises(CorruptFileError, match="cannot read the train split's index"):
        build_pretrain_dataset(DataConfig(data_path=str(store)))

    other = cell_painting(tmp_path / "other", sizes=((32, 32),) * 2, seed=1)
    code, _, err = pack("--data_path", other, "--out", store)
    assert (
        code == 1
        and err.strip()
        == f"ERROR: --out {store} holds a packed store of other samples; remove it or choose another --out"
    )


def coordinate_field(root: Path, height=48, width=64) -> Path:
    """One (2, H, W) float32 image whose channels are the x and y coordinates, so a crop's box can be read back."""
    root.mkdir()
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    np.save(root / "field.npy", np.stack([x, y]))
    return root


def boxes(crops: torch.Tensor) -> np.ndarray:
    """(N, 2, S, S) crops of ``coordinate_field`` -> (N, 2) window (width, height): bicubic resizing reproduces a
    linear ramp inside the crop, so the slope between columns S/4 and 3S/4 gives the window's size."""
    s = crops.shape[-1]
    lo, hi = s // 4, 3 * s // 4
    width = (crops[:, 0, :, hi] - crops[:, 0, :, lo]).abs().mean(1) * s / (hi - lo)
    height = (crops[:, 1, hi, :] - crops[:, 1, lo, :]).abs().mean(1) * s / (hi - lo)
    return torch.stack([width, height], 1).numpy()


def sampled_boxes(dataset, on_device: bool, n: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    if not on_device:
        return boxes(torch.stack([dataset[0][0] for _ in range(n)]))
    crops = WindowCrops(dataset, on_device=True)
    batch, _ = collate_windows([crops[0] for _ in range(n)])
    return boxes(crops.device_augment(batch.to("cpu")))


def test_device_crops_follow_the_cpu_crop_distribution(tmp_path):
    """Scale and aspect ratio of the --gpu_augment crops against torchvision v2's RandomResizedCrop on the CPU,
    from independent draws (two-sample KS tests); a different --scale is told apart (the test can fail)."""
    flags = dict(data_path=str(coordinate_field(tmp_path / "field")), input_size=16, mean=[0, 0], std=[1, 1])
    dataset = build_pretrain_dataset(DataConfig(**flags))
    cpu, device = sampled_boxes(dataset, False, 1500, seed=1), sampled_boxes(dataset, True, 1500, seed=2)

    def features(b):
        return b[:, 0] * b[:, 1] / (48 * 64), np.log(b[:, 0] / b[:, 1])

    for a, b in zip(features(cpu), features(device)):
        assert ks_2samp(a, b).pvalue > 1e-3
    assert 0.18 < features(device)[0].min() and features(device)[0].max() < 1.02  # 0.2..1, boxes in whole pixels
    other = build_pretrain_dataset(DataConfig(**flags, scale=[0.5, 1.0]))
    assert ks_2samp(features(sampled_boxes(other, False, 1500, seed=3))[0], features(device)[0]).pvalue < 1e-3


@pytest.mark.parametrize("vflip", [False, True])
def test_window_crops_give_the_cpu_transform_exactly(tmp_path, vflip):
    """Same seed -> the same crop, flips and values from the CPU transform on the whole decoded image, the crop
    cut from a packed store's memory map, and the device-side augmentation (on the CPU here)."""
    src = cell_painting(tmp_path / "src", sizes=((40, 48),) * 3)
    assert pack("--data_path", src, "--out", tmp_path / "store")[0] == 0
    flags = dict(input_size=24, vflip=vflip, channels="4,0,2")
    files = build_pretrain_dataset(DataConfig(data_path=str(src), **flags))
    packed = build_pretrain_dataset(DataConfig(data_path=str(tmp_path / "store"), **flags))
    for i in range(3):
        torch.manual_seed(i)
        expected = files[i][0]
        for dataset in (files, packed):
            torch.manual_seed(i)
            torch.testing.assert_close(WindowCrops(dataset, on_device=False)[i][0], expected, rtol=0, atol=0)
            torch.manual_seed(i)
            crops = WindowCrops(dataset, on_device=True)
            batch, labels = collate_windows([crops[i], crops[(i + 1) % 3]])
            assert batch.pixels.dtype == torch.uint16 and labels.tolist() == [-1, -1]
            torch.testing.assert_close(crops.device_augment(batch.to("cpu"))[0], expected, rtol=1e-6, atol=1e-5)


def test_device_batches_from_a_worker_equal_those_of_the_main_process(tmp_path):
    """A DataLoader worker builds --gpu_augment batches in shared memory; they equal the main process's (whole
    square fields, no flips: the same windows whatever the random streams)."""
    src = cell_painting(tmp_path / "src", sizes=((40, 40),) * 4)
    assert pack("--data_path", src, "--out", tmp_path / "store")[0] == 0
    flags = dict(data_path=str(tmp_path / "store"), input_size=16, scale=[1.0, 1.0], hflip=0.0)
    crops = WindowCrops(build_pretrain_dataset(DataConfig(**flags)), True)

    def batches(workers):
        generator = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(
            crops, batch_size=2, num_workers=workers, collate_fn=crops.collate_fn, generator=generator
        )
        return [crops.device_augment(batch) for batch, _ in loader]

    for a, b in zip(batches(0), batches(1), strict=True):
        assert a.shape == (2, 5, 16, 16)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packed_training_reads_windows_and_gpu_augment_needs_the_crop_transform(tmp_path):
    src = cell_painting(tmp_path / "src", sizes=((32, 32),) * 2)
    assert pack("--data_path", src, "--out", tmp_path / "store")[0] == 0
    packed = build_pretrain_dataset(DataConfig(data_path=str(tmp_path / "store"), input_size=16))
    files = build_pretrain_dataset(DataConfig(data_path=str(src), input_size=16))
    args = DataConfig(data_path="rgb")
    assert isinstance(training_items(packed, args), WindowCrops) and training_items(files, args) is files
    rgb = tmp_path / "rgb"
    for split in ("train", "val"):
        os.makedirs(rgb / split / "a")
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(rgb / split / "a" / "x.png")
    dataset = build_dataset(True, DataConfig(data_path=str(rgb), input_size=16))
    assert training_items(dataset, args) is dataset
    gpu = type("Args", (), {"gpu_augment": True, "data_path": str(rgb)})()
    with pytest.raises(DatasetError, match="--gpu_augment: the training transform of --data_path .* is not a random"):
        training_items(dataset, gpu)


def test_pretrain_cli_with_gpu_augment_on_a_packed_store(tmp_path):
    src = cell_painting(tmp_path / "src", sizes=((32, 32),) * 8)
    assert pack("--data_path", src, "--out", tmp_path / "store")[0] == 0
    tiny = ["depth=1", "embed_dim=32", "num_heads=2", "decoder_embed_dim=32", "decoder_depth=1", "decoder_num_heads=2"]
    cmd = [sys.executable, "main_pretrain.py", "--device", "cpu", "--data_path", str(tmp_path / "store")]
    cmd += ["--gpu_augment", "--input_size", "16", "--patch_size", "8", "--batch_size", "4", "--epochs", "1"]
    cmd += ["--num_workers", "0", "--vis_every", "1", "--print_freq", "1", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*cmd, "--model_kwargs", *tiny], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: " in proc.stdout  # the per-step input time stays in the log
    assert list((tmp_path / "out").glob("checkpoint-*.pth")) and list((tmp_path / "out" / "vis").glob("*.png"))


def test_fast_paths_only_on_cuda_and_worker_default(monkeypatch):
    precision = torch.get_float32_matmul_precision()
    assert enable_fast_paths(torch.device("cpu")) == [] and adamw_kwargs(torch.device("cpu")) == {}
    assert torch.get_float32_matmul_precision() == precision and not torch.backends.cudnn.benchmark
    assert adamw_kwargs(torch.device("cuda")) == {"fused": True} and adamw_kwargs(torch.device("cuda"), False) == {}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_num_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers() == 3


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry_run: every step of the GPU validation on the CPU with tiny models and data."""
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry_run", str(tmp_path)], cwd=ROOT, timeout=900)
    assert proc.returncode == 0
    summary = (tmp_path / "summary.txt").read_text()
    assert "exit" in summary and all(": exit 0," in line for line in summary.splitlines() if ": exit " in line)
    assert "waiting for data" in summary and summary.count("-> ok") == 2 and "| packed | device |" in summary
    report = json.loads((tmp_path / "train_bf16_eager.json").read_text())
    assert {r["model"] for r in report["results"]} == {"mae_vit_base_patch16", "chamae_vit_base_patch16"}
