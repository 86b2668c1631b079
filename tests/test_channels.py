"""Channels by name (issue 14): names of every dataset, the vocabulary saved with each checkpoint, mapping by name at
load time (permuted, dropped and unknown columns, old positional checkpoints), and pretraining on several sources
with different channel sets (per-source batches and losses, exact mid-epoch resume, torchrun)."""

import builtins
import contextlib
import io
import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import read_log
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import util.preemption
from util.data.builders import build_dataset, build_pretrain_dataset
from util.data.errors import DatasetError
from util.data.sources import build_pretrain_sources
from util.data.vocabulary import UnknownChannelError, map_to_vocabulary
from util.loaders import SourceBatchSampler
from util.preemption import restore_stop_handlers

REPO = Path(__file__).resolve().parents[1]
IHC = REPO / "sample_data" / "ihc"
IHC_NAMES = ["R", "G", "B", "H", "E", "DAB"]
TINY = [
    "--input_size", "32", "--patch_size", "8", "--batch_size", "8", "--num_workers", "0",
    "--model_kwargs", "embed_dim=32", "depth=1", "num_heads=2",
]  # fmt: skip
DECODER = ["decoder_embed_dim=32", "decoder_depth=1", "decoder_num_heads=2", "--vis_every", "0"]
COLUMNS = {"orig": "R,H,E,DAB", "perm": "E,DAB,R,H", "drop": "R,H,DAB", "extra": "R,H,GFP,DAB"}
PLANE = {"R": 0, "GFP": 1, "H": 3, "E": 4, "DAB": 5}  # the IHC tile plane each column holds (GFP: the green plane)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Per-channel CSV roots made of the bundled IHC tiles, one single-channel TIFF per channel: 'orig' (columns
    R,H,E,DAB), 'perm' (the same columns permuted), 'drop' (without E), 'extra' (with a GFP column no checkpoint
    knows); 24 train and 16 val samples, labelled by whether their DAB stain is above the median. Also 'ihc': 32 of
    the 6-channel tiles as they are, with their channels.txt and channel_stats.json."""
    base = tmp_path_factory.mktemp("channels")
    tiles = sorted(IHC.glob("*.tif"))[:40]
    (base / "ihc").mkdir()
    for path in [*tiles[:32], IHC / "channels.txt", IHC / "channel_stats.json"]:
        shutil.copy(path, base / "ihc")
    stacks = [tifffile.imread(t) for t in tiles]
    dab = np.median([s[5].mean() for s in stacks])
    (base / "planes").mkdir()
    for i, stack in enumerate(stacks):
        for name, plane in PLANE.items():
            tifffile.imwrite(base / "planes" / f"t{i}_{name}.tif", stack[plane])
    for root, columns in COLUMNS.items():
        (base / root).mkdir()
        for split, rows in (("train", range(24)), ("val", range(24, 40))):
            lines = [f"{columns},label"]
            for i in rows:
                label = "dab" if stacks[i][5].mean() > dab else "low"
                lines.append(",".join(f"../planes/t{i}_{c}.tif" for c in columns.split(",")) + f",{label}")
            (base / root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return base


def run_script(script: str, *args) -> tuple:
    """(exit code or 'ERROR: ...', stdout) of the script's ``__main__`` run in this process on one thread."""
    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(sys, "argv", [script, "--device", "cpu", *map(str, args)])
        patch.setattr(builtins, "print", builtins.print)  # setup_for_distributed wraps it
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
        finally:
            restore_stop_handlers()
            torch.set_num_threads(threads)
    return code, out.getvalue()


@pytest.fixture
def cli():
    return run_script


def ok(result):
    code, out = result
    assert code in (0, None), f"{code}\n{out[-3000:]}"
    return out


@pytest.fixture(scope="module")
def pretrained(roots, tmp_path_factory):
    """A tiny ChannelMAE pretrained for 2 epochs on the 'orig' columns (R,H,E,DAB)."""
    out = tmp_path_factory.mktemp("pretrain")
    flags = ["--epochs", "2", "--warmup_epochs", "1", "--data_path", roots / "orig" / "train.csv"]
    ok(run_script("main_pretrain.py", *flags, "--output_dir", out, *TINY, *DECODER))
    return out / "checkpoint-last.pth"


def args(path, **kw):
    return Namespace(data_path=str(path), input_size=32, **kw)


# ------------------------------------------------------------------------------------------ names of every dataset


def test_every_dataset_names_its_channels(roots, tmp_path, caplog):
    """CSV headers, channels.txt and --channel_names name the channels; --channels takes names or ids; data that
    nothing names get positional names, said once."""
    perm = build_dataset(True, args(roots / "perm", channels="DAB,R", mean=[0] * 4, std=[1] * 4))
    assert (perm.channel_names, perm.channel_ids, perm.read_names) == (["E", "DAB", "R", "H"], [1, 2], ["DAB", "R"])
    assert build_dataset(True, args(roots / "perm", channels="3,E", mean=[0] * 4, std=[1] * 4)).read_names == [
        "H",
        "E",
    ]
    ihc = build_pretrain_dataset(args(IHC, channels="DAB,H"))
    assert (ihc.channel_names, ihc.channel_ids) == (IHC_NAMES, [5, 3])
    renamed = build_pretrain_dataset(args(IHC, channel_names="r,g,b,h,e,d", channels="d"))
    assert renamed.read_names == ["d"] and renamed.mean == ihc.mean[:1]  # channel_stats.json is by position here
    with pytest.raises(DatasetError, match=r"'GFP' is neither a channel name nor an id; the data's channels are R,G"):
        build_pretrain_dataset(args(IHC, channels="R,GFP"))
    with pytest.raises(DatasetError, match=r"--channel_names 'a,b' lists 2 channel names but the data have 6"):
        build_pretrain_dataset(args(IHC, channel_names="a,b"))
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.full((2, 8, 8), i, np.float32))
    with caplog.at_level(logging.WARNING, logger="util.data"):
        unnamed = [build_pretrain_dataset(args(tmp_path, mean=[0, 0], std=[1, 1])) for _ in range(2)]
    assert unnamed[0].channel_names == ["ch0", "ch1"]
    assert caplog.text.count("positional names ch0,ch1") == 1


def test_vocabulary_maps_by_name():
    """Rows by name whatever the order; an unknown name is an error naming it and the known names unless it is
    added as a new row; a positional vocabulary (old checkpoints) maps by file position."""
    vocabulary = ["R", "H", "E", "DAB"]
    assert map_to_vocabulary(["E", "DAB", "R"], [0, 1, 2], vocabulary) == ([2, 3, 0], vocabulary)
    with pytest.raises(UnknownChannelError, match=r"'GFP' \(of GFP\) is not one of .*: R,H,E,DAB.*--new_channels GFP"):
        map_to_vocabulary(["R", "GFP"], [0, 1], vocabulary)
    assert map_to_vocabulary(["R", "GFP"], [0, 1], vocabulary, ["GFP"]) == ([0, 4], [*vocabulary, "GFP"])
    assert map_to_vocabulary(["DAB", "H"], [5, 3], ["ch0", "ch1", "ch2", "ch3", "ch4", "ch5"])[0] == [5, 3]


# ---------------------------------------------------------------------------------- checkpoints map by name


def extract(cli, ckpt, root, tmp_path, *flags):
    out = tmp_path / f"{root.name}{'_'.join(flags)}.npz"
    ok(cli("extract_features.py", "--resume", ckpt, "--data_path", root / "val.csv", "--out", out, *flags))
    return np.load(out)


def test_permuted_and_dropped_columns_give_the_same_features(roots, pretrained, cli, tmp_path):
    """The checkpoint records R,H,E,DAB with their statistics; permuted columns give the same features, a dropped
    column the features of the original with that channel left out (the right embedding rows)."""
    checkpoint = torch.load(pretrained, map_location="cpu", weights_only=True)
    assert checkpoint["channel_names"] == ["R", "H", "E", "DAB"] and "vocabulary" not in checkpoint["args"]
    stats = checkpoint["channel_stats"]
    assert len(stats["mean"]) == len(stats["std"]) == 4 and all(isinstance(v, float) for v in stats["std"])
    orig, perm = extract(cli, pretrained, roots / "orig", tmp_path), extract(cli, pretrained, roots / "perm", tmp_path)
    assert list(perm["channel_names"]) == ["E", "DAB", "R", "H"] and list(perm["channel_ids"]) == [2, 3, 0, 1]
    diff = np.abs(orig["features"] - perm["features"]).max()
    order = [list(perm["channel_names"]).index(n) for n in orig["channel_names"]]
    channel_diff = np.abs(orig["channel_features"] - perm["channel_features"][:, order]).max()
    print(f"permuted columns: max |features diff| {diff:.2e}, per channel {channel_diff:.2e}")
    assert diff < 1e-5 and channel_diff < 1e-5 and np.abs(orig["features"]).max() > 0.1
    drop = extract(cli, pretrained, roots / "drop", tmp_path)
    subset = extract(cli, pretrained, roots / "orig", tmp_path, "--channels", "R,H,DAB")
    assert list(drop["channel_ids"]) == [0, 1, 3] == list(subset["channel_ids"])
    assert np.abs(drop["features"] - subset["features"]).max() < 1e-5
    assert np.abs(drop["features"] - orig["features"]).max() > 1e-3  # leaving E out does change them


def test_permuted_columns_give_the_same_accuracy_and_unknown_channels(roots, pretrained, cli, tmp_path):
    """Fine-tune on R,H,E,DAB, evaluate on the permuted columns: the same predictions. A column the checkpoint does
    not know is an error naming it, and with --new_channels it gets a fresh embedding row and trains."""
    finetune = [*TINY[:-4], "--model_kwargs", "num_heads=2", "--epochs", "1", "--warmup_epochs", "0"]
    out = ok(cli("main_finetune.py", "--finetune", pretrained, "--data_path", roots / "orig", *finetune,
                 "--output_dir", tmp_path / "ft"))  # fmt: skip
    assert "Channel vocabulary (4 embedding rows): R,H,E,DAB" in out
    ckpt = tmp_path / "ft" / "checkpoint-last.pth"
    accuracy = {}
    for root in ("orig", "perm"):
        out = ok(cli("main_finetune.py", "--eval", "--resume", ckpt, "--data_path", roots / root, "--num_workers", "0"))
        accuracy[root] = [line for line in out.splitlines() if line.startswith('{"test_acc1"')][-1]
    print(f"eval accuracy orig {accuracy['orig']} / permuted {accuracy['perm']}")
    assert accuracy["orig"] == accuracy["perm"]

    extra = ["--finetune", pretrained, "--data_path", roots / "extra", *finetune]
    code, _ = cli("main_finetune.py", *extra, "--output_dir", tmp_path / "no")
    assert code.startswith("ERROR: channel 'GFP' (of GFP) is not one of the channels") and "R,H,E,DAB" in code
    ok(cli("main_finetune.py", *extra, "--new_channels", "GFP", "--output_dir", tmp_path / "new"))
    grown = torch.load(tmp_path / "new" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert grown["channel_names"] == ["R", "H", "E", "DAB", "GFP"]
    assert grown["model"]["channel_embed"].shape[0] == 5 and read_log(tmp_path / "new")[0]["train_loss"] > 0


def test_old_positional_checkpoint_still_finetunes(roots, pretrained, cli, tmp_path, caplog):
    """A checkpoint from before channel names (no vocabulary, no names in its normalisation) maps by position."""
    old = torch.load(pretrained, map_location="cpu", weights_only=True)
    for key in ("channel_names", "channel_stats"):
        del old[key]
    del old["args"]["normalization"]["names"]
    torch.save(old, tmp_path / "old.pth")
    flags = [*TINY[:-4], "--model_kwargs", "num_heads=2", "--epochs", "1", "--output_dir", tmp_path / "out"]
    with caplog.at_level(logging.WARNING, logger="util.data"):
        out = ok(cli("main_finetune.py", "--finetune", tmp_path / "old.pth", "--data_path", roots / "orig", *flags))
    assert "records no channel names: its 4 channels are taken by position" in caplog.text
    assert "Channel vocabulary (4 embedding rows): ch0,ch1,ch2,ch3" in out and read_log(tmp_path / "out")


# ------------------------------------------------------------------------------------------- several sources


def test_source_batch_sampler_is_the_same_on_every_rank():
    """Every rank: the same number of batches and the same source at every step, disjoint samples, an order that
    depends only on (seed, epoch), and a mid-epoch start that skips exactly the batches done."""
    sizes = [50, 21]
    ranks = [SourceBatchSampler(sizes, 4, 2, rank, seed=3, weights=[1.0, 2.0]) for rank in range(2)]
    epochs = {}
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        epochs[epoch] = [list(sampler) for sampler in ranks]
    a, b = epochs[0]
    assert len(a) == len(b) == len(ranks[0]) == 6 + 5
    sources = [int(batch[0] >= 50) for batch in a], [int(batch[0] >= 50) for batch in b]
    assert sources[0] == sources[1] and sorted(sources[0]) == [0] * 6 + [1] * 5
    assert all(len({i >= 50 for i in batch}) == 1 for batch in a + b)
    first = [i for batch in a + b for i in batch if i < 50]
    assert len(first) == len(set(first)) == 48
    assert epochs[1] != epochs[0]
    ranks[0].set_epoch(0)
    ranks[0].start = 4
    assert list(ranks[0]) == a[4:] and len(ranks[0]) == 7


def test_data_mix_file(roots, tmp_path):
    """A data-mix file: sources relative to it, weights, per-source statistics and channel names, a vocabulary."""
    stats = tmp_path / "s2_stats.json"
    stats.write_text((REPO / "sample_data" / "sentinel2" / "channel_stats.json").read_text())
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({
        "sources": [
            {"path": os.path.relpath(roots / "ihc", tmp_path)},
            {"path": os.path.relpath(REPO / "sample_data" / "sentinel2", tmp_path), "weight": 2,
             "channel_stats": "s2_stats.json", "channel_names": "B02,B03,B04,B08,B11,B12"},
        ],
        "channel_vocabulary": ["B02", "B03", "B04", "B08", "B11", "B12", "R", "G", "B", "H", "E", "DAB"],
    }))  # fmt: skip
    datasets, sources, vocabulary = build_pretrain_sources(Namespace(data_path=str(mix), input_size=32))
    assert [(s.name, s.weight) for s in sources] == [("ihc", 1.0), ("sentinel2", 2.0)] and vocabulary[0] == "B02"
    assert datasets[1].read_names[0] == "B02" and datasets[1].norm_source == str(stats)
    sampler = SourceBatchSampler([len(d) for d in datasets], 8, 1, 0, 0, [s.weight for s in sources])
    assert sampler.counts == [32 // 8, 2 * 54 // 8]
    mix.write_text(json.dumps({"sources": [{"path": "x", "wieght": 2}]}))
    with pytest.raises(DatasetError, match=r"mix.json: source 0 has unknown keys \['wieght'\]"):
        build_pretrain_sources(Namespace(data_path=str(mix)))


def mixed_flags(roots, output_dir, epochs=2):
    return [
        *("--data_path", roots / "ihc", roots / "orig" / "train.csv", "--epochs", epochs, "--warmup_epochs", "1"),
        *("--output_dir", output_dir, "--print_freq", "1", "--save_every", "1", *TINY, *DECODER),
    ]


def test_two_sources_train_log_per_source_and_resume_exactly(roots, cli, tmp_path, monkeypatch):
    """Sources with 6 (R,G,B,H,E,DAB) and 4 (R,H,E,DAB) channels in one ChannelMAE run: one vocabulary, a loss per
    source in log.txt, and a run stopped mid-epoch then resumed ends with the same weights and log."""
    out = ok(cli("main_pretrain.py", *mixed_flags(roots, tmp_path / "full"), "--mask_mode", "spatial"))
    assert "Channel vocabulary (6 embedding rows): R,G,B,H,E,DAB" in out
    assert "source orig_train (24 samples, weight 1): channels R,H,E,DAB -> rows [0, 3, 4, 5]" in out
    log = read_log(tmp_path / "full")
    print("per-source losses:", [{k: round(v, 4) for k, v in e.items() if k.startswith("train_loss")} for e in log])
    assert all(e["train_loss_ihc"] > 0 and e["train_loss_orig_train"] > 0 for e in log)
    losses = sorted([log[-1]["train_loss_ihc"], log[-1]["train_loss_orig_train"]])
    assert losses[0] <= log[-1]["train_loss"] <= losses[1]
    accumulator = EventAccumulator(str(tmp_path / "full"))
    accumulator.Reload()
    assert {"train_loss_ihc", "train_loss_orig_train"} <= set(accumulator.Tags()["scalars"])

    calls = {"n": 0}
    real = util.preemption.stop_requested

    def stop_at_step_5_of_epoch_1():
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] == 6 + 1 + 3 else real()  # 6 step polls + 1 after epoch 0, then 3

    monkeypatch.setattr(util.preemption, "stop_requested", stop_at_step_5_of_epoch_1)
    code, _ = cli("main_pretrain.py", *mixed_flags(roots, tmp_path / "stop"), "--mask_mode", "spatial")
    assert code == 128 + signal.SIGTERM
    stopped = torch.load(tmp_path / "stop" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert stopped["epoch"] == 1 and stopped[util.preemption.PROGRESS_KEY]["step"] == 3
    monkeypatch.setattr(util.preemption, "stop_requested", real)
    ok(cli("main_pretrain.py", *mixed_flags(roots, tmp_path / "stop"), "--mask_mode", "spatial", "--auto_resume"))
    assert read_log(tmp_path / "stop") == log
    full = torch.load(tmp_path / "full" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "stop" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])


def test_mae_refuses_sources_with_different_channels(roots, cli, tmp_path):
    code, _ = cli("main_pretrain.py", *mixed_flags(roots, tmp_path), "--model", "mae_vit_tiny_patch16")
    assert code.startswith("ERROR: mae_vit_tiny_patch16 takes one fixed channel set") and "chamae_vit_tiny" in code


def test_bag_of_channels_refuses_several_sources(roots, cli, tmp_path):
    flags = (*mixed_flags(roots, tmp_path), "--model", "mae_vit_tiny_patch16", "--bag_of_channels")
    code, _ = cli("main_pretrain.py", *flags)
    assert code == "ERROR: --bag_of_channels draws channels from one source; --data_path gives 2"


def test_two_sources_under_torchrun(roots, tmp_path):
    """2 processes (gloo), sources of 6 and 4 channels, HCS and the cross decoder: no hang, the same number of
    batches on both ranks, a loss per source."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_pretrain.py"]
    flags = mixed_flags(roots, tmp_path, epochs=1)
    flags[flags.index("--batch_size") + 1] = "4"
    cmd += ["--device", "cpu", *map(str, flags), "--hcs", "--decoder", "cross", "--decode_ratio", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "[rank 0] 7 batches per epoch" in out and "[rank 1] 7 batches per epoch" in out
    entry = read_log(tmp_path)[0]
    assert entry["train_loss_ihc"] > 0 and entry["train_loss_orig_train"] > 0
