"""Several labelled sources for ChannelViT fine-tuning and evaluation (issue 14): the union of the sources' classes
and channel names, one source per training batch, per-source val accuracy, exact mid-epoch resume, and a vit_*
model refusing sources whose channels differ."""

import json
import shutil
import signal

import pytest
import torch
from conftest import read_log
from test_channels import IHC, TINY, ok, roots, run_script  # noqa: F401 (roots: the module fixture)

import util.preemption

FINETUNE = [*TINY[:-4], "--model_kwargs", "num_heads=2", "--warmup_epochs", "0", "--print_freq", "1"]


@pytest.fixture(scope="module")
def ihc_classes(tmp_path_factory):
    """Class folders of the bundled 6-channel IHC tiles: classes 'even' and 'odd', 16 train and 8 val tiles."""
    base = tmp_path_factory.mktemp("ihc_classes")
    tiles = sorted(IHC.glob("*.tif"))[:24]
    for i, tile in enumerate(tiles):
        split = "train" if i < 16 else "val"
        folder = base / split / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(tile, folder)
    for name in ("channels.txt", "channel_stats.json"):
        shutil.copy(IHC / name, base)
    return base


def test_two_labelled_sources_finetune_and_eval(roots, ihc_classes, tmp_path):  # noqa: F811
    """IHC tiles (R,G,B,H,E,DAB; classes even/odd) and a CSV root (R,H,E,DAB; classes dab/low) in one ChannelViT
    fine-tune: 6 embedding rows, 4 classes, per-source val accuracy in log.txt, and --eval --resume of the last
    checkpoint gives the final test stats again (losses
    within float32 rounding)."""
    data = ["--data_path", ihc_classes, roots / "orig"]
    out = ok(run_script("main_finetune.py", *data, *FINETUNE, "--epochs", "2", "--output_dir", tmp_path))
    assert "Channel vocabulary (6 embedding rows): R,G,B,H,E,DAB" in out
    assert "2 sources, 40 samples, 4 classes" in out
    log = read_log(tmp_path)
    print("per-source accuracy:", [{k: v for k, v in e.items() if k.startswith("test_acc1")} for e in log])
    last = log[-1]
    assert last["test_n"] == 8 + 16 and last["train_loss_orig"] > 0 and last["train_loss_ihc_classes0"] > 0
    per_source = [last[k] for k in last if k.startswith("test_acc1_")]
    assert len(per_source) == 2
    assert last["test_acc1"] == pytest.approx((per_source[0] * 8 + per_source[1] * 16) / 24)
    ckpt = tmp_path / "checkpoint-last.pth"
    out = ok(run_script("main_finetune.py", "--eval", "--resume", ckpt, *data, "--num_workers", "0"))
    stats = json.loads([line for line in out.splitlines() if line.startswith('{"test_acc1"')][-1])
    final = {k: v for k, v in last.items() if k.startswith("test_")}
    assert {k: v for k, v in stats.items() if "loss" not in k} == {k: v for k, v in final.items() if "loss" not in k}
    assert stats == pytest.approx(final, rel=1e-6)  # the recorded statistics round-trip through float32


def test_vit_refuses_sources_with_different_channels(roots, ihc_classes, tmp_path):  # noqa: F811
    data = ["--data_path", ihc_classes, roots / "orig", "--model", "vit_tiny_patch16"]
    code, _ = run_script("main_finetune.py", *data, *FINETUNE, "--epochs", "1", "--output_dir", tmp_path)
    assert code.startswith("ERROR: vit_tiny_patch16 takes one fixed channel set") and "channelvit_tiny" in code


def test_linear_probe_on_two_sources(roots, ihc_classes, tmp_path):  # noqa: F811
    data = ["--data_path", ihc_classes, roots / "orig"]
    ok(run_script("main_linprobe.py", *data, *FINETUNE, "--epochs", "1", "--output_dir", tmp_path))
    last = read_log(tmp_path)[-1]
    assert {"test_acc1_ihc_classes0", "test_acc1_orig", "train_loss_orig"} <= set(last) and last["test_n"] == 24


def test_two_source_finetune_resumes_mid_epoch_exactly(roots, ihc_classes, tmp_path, monkeypatch):  # noqa: F811
    """A two-source fine-tune stopped mid-epoch and resumed ends with the weights and log of an uninterrupted run."""
    data = ["--data_path", ihc_classes, roots / "orig", *FINETUNE, "--epochs", "2", "--save_every", "1"]
    ok(run_script("main_finetune.py", *data, "--output_dir", tmp_path / "full"))
    calls, real = {"n": 0}, util.preemption.stop_requested

    def stop_at_step_3_of_epoch_1():
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] == 5 + 3 else real()  # the 5 step polls of epoch 0, then 3

    monkeypatch.setattr(util.preemption, "stop_requested", stop_at_step_3_of_epoch_1)
    code, _ = run_script("main_finetune.py", *data, "--output_dir", tmp_path / "stop")
    assert code == 128 + signal.SIGTERM
    stopped = torch.load(tmp_path / "stop" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert stopped["epoch"] == 1 and stopped[util.preemption.PROGRESS_KEY]["step"] == 3
    monkeypatch.setattr(util.preemption, "stop_requested", real)
    ok(run_script("main_finetune.py", *data, "--output_dir", tmp_path / "stop", "--auto_resume"))
    assert read_log(tmp_path / "stop") == read_log(tmp_path / "full")
    full = torch.load(tmp_path / "full" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "stop" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
