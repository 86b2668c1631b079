"""Faults and bad input, provoked for real on the CPU with tiny models (issue 8, README "Failure behaviour").

Real SIGKILL, SIGTERM and SIGUSR1 hit a training process, a process is killed half-way through writing a
checkpoint, a save meets a full disk (writes to /dev/full fail with ENOSPC), --output_dir cannot be written,
image files are corrupt or do not match, the loss turns NaN, checkpoints belong to another model or hold pickled
objects, and there is too little data. Kills and signals run the scripts as subprocesses (their stderr must hold
no traceback). The other cases run the scripts' ``__main__`` blocks in this process with ``runpy``: the same
argument parsing and ``run_main`` exit (``ERROR: <message>``, status 1) as the command line, without ~5 s
of imports per case; an exception other than the expected errors would fail the test with its traceback.

Covered elsewhere, not repeated: the data layer's checks of truncated/corrupt files and channel or size
mismatches (tests/test_datasets.py), ``atomic_save`` keeping the old file when pickling fails,
``find_latest_checkpoint`` ignoring ``*.tmp`` names and ``load_checkpoint``'s weights_only refusal
(tests/test_misc.py), a NaN loss at the first step of an epoch and exact resumption from epoch checkpoints
(tests/test_training.py).
"""

import argparse
import builtins
import hashlib
import json
import multiprocessing
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import read_log
from PIL import Image

import models_chamae
import models_checkpoint
import models_mae
import models_vit
from util.checkpoint import find_latest_checkpoint, load_checkpoint
from util.data.builders import build_pretrain_dataset
from util.errors import CheckpointError, CheckpointMismatchError
from util.loaders import EpochSampler
from util.output_dir import LOCK_FILENAME, lock_output_dir, release_output_dir
from util.preemption import PROGRESS_KEY, restore_stop_handlers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample_data")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
TINY_ENCODER = ["--input_size", "32", "--patch_size", "8", "--model_kwargs", "embed_dim=64", "depth=1", "num_heads=2"]
TINY_MAE = ["--vis_every", "0", *TINY_ENCODER, "decoder_embed_dim=64", "decoder_depth=1", "decoder_num_heads=2"]
TINY_VIT = ["--batch_size", "10", "--num_workers", "0", *TINY_ENCODER]
IHC_TILES = 40
STEPS = IHC_TILES // 2  # per epoch at --batch_size 2
EPOCH_1_STARTED = re.compile(r"Epoch: \[1\] \[\s*0/")

# Runs a script like `python script args`, but its first torch.save writes half of the checkpoint and then
# SIGKILLs its own process: a kill that lands, deterministically, in the middle of a write.
DIE_WHILE_SAVING = """
import io, os, runpy, signal, sys
import torch
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    data = io.BytesIO()
    real_save(obj, data)
    f.write(data.getvalue()[: data.tell() // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Locks the output directory given as argument, forks a child that lives until its stdin closes, then SIGKILLs
# itself: the child outlives the lock holder.
HOLD_LOCK_FORK_AND_DIE = """
import os, signal, sys
from util.output_dir import lock_output_dir
lock_output_dir(sys.argv[1])
if os.fork() == 0:
    sys.stdin.read()
    os._exit(0)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


class Payload:
    """Unpickling this runs ``os.makedirs(marker)``: a stand-in for code planted in a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


# ----------------------------------------------------------------------------------------------- helpers


def command(script: str, *args) -> list[str]:
    return [sys.executable, script, "--device", "cpu", *map(str, args)]


def run(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(script, *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def start(script: str, *args) -> subprocess.Popen:
    """Start a script in its own process group (as Slurm starts a job step), stdout and stderr piped."""
    return subprocess.Popen(
        command(script, *args),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(proc: subprocess.Popen, pattern: re.Pattern) -> str:
    """Read ``proc``'s stdout up to a line matching ``pattern``; return what was read."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if pattern.search(line):
            return "".join(seen)
    proc.wait(timeout=60)
    pytest.fail(f"the process ended ({proc.returncode}) before {pattern.pattern!r}:\n{proc.stderr.read()[-4000:]}")


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(script, *args) -> (exit code or 'ERROR: ...' message, stdout)``: the script's ``__main__`` block
    run in this process."""

    def call(script: str, *args):
        monkeypatch.setattr(sys, "argv", command(script, *args)[1:])
        monkeypatch.setattr(builtins, "print", builtins.print)  # setup_for_distributed wraps it
        try:
            runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
        finally:
            restore_stop_handlers()
        return code, capsys.readouterr().out

    return call


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(path_a, path_b):
    a, b = load(path_a)["model"], load(path_b)["model"]
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"weights differ from the uninterrupted run: {different}"


def checkpoint_files(output_dir) -> list[str]:
    return sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint"))


def pretrain_flags(data_path, output_dir, workers: int = 0) -> list:
    """2 epochs of STEPS steps each, a checkpoint after every epoch, a log line after every step."""
    return [
        *("--data_path", data_path, "--output_dir", output_dir, "--epochs", "2", "--batch_size", "2"),
        *("--warmup_epochs", "1", "--blr", "1e-2", "--save_every", "1", "--print_freq", "1"),
        *("--num_workers", workers, *TINY_MAE),
    ]


def write_npy_folder(root, count: int, shape=(1, 32, 32)) -> list:
    """root/NN.npy files of float32 noise."""
    os.makedirs(root)
    rng = np.random.default_rng(0)
    paths = [root / f"{i:02d}.npy" for i in range(count)]
    for path in paths:
        np.save(path, rng.normal(size=shape).astype(np.float32))
    return paths


# ----------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def ihc(tmp_path_factory):
    """The first IHC_TILES 6-channel tiles of sample_data/ihc, with their statistics and channel names."""
    src, dst = os.path.join(SAMPLE, "ihc"), tmp_path_factory.mktemp("ihc")
    tiles = sorted(name for name in os.listdir(src) if name.endswith(".tif"))[:IHC_TILES]
    for name in [*tiles, "channel_stats.json", "channels.txt"]:
        shutil.copy(os.path.join(src, name), dst / name)
    return dst


@pytest.fixture(scope="module")
def digits(digits_subset):
    """4 train and 2 val images per class of sample_data/digits (1 channel, 32x32 PNG)."""
    return digits_subset(4, 2)


@pytest.fixture(scope="module")
def reference(ihc, tmp_path_factory):
    """Output dir of the uninterrupted run that the interrupted ones must reproduce."""
    output_dir = tmp_path_factory.mktemp("reference")
    run("main_pretrain.py", *pretrain_flags(ihc, output_dir))
    assert checkpoint_files(output_dir) == ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"]
    return output_dir


# ----------------------------------------------------------------------------------------------- kills and signals


def test_kills_and_stop_signals_lose_nothing(ihc, reference, tmp_path):
    """One run of the reference's training, interrupted three times, each time continued with --auto_resume:
    SIGKILL in the middle of epoch 1, SIGTERM in the middle of epoch 1, SIGKILL while the checkpoint of epoch 1
    is being written. The end result equals the uninterrupted run: logs and weights, bit for bit."""
    out_dir = tmp_path / "out"
    flags = [*pretrain_flags(ihc, out_dir), "--auto_resume"]
    last = out_dir / "checkpoint-last.pth"

    # 1. SIGKILL mid-epoch: nothing of epoch 1 is saved, epoch 0 is complete
    proc = start("main_pretrain.py", *flags)
    seen = wait_for(proc, EPOCH_1_STARTED)
    proc.kill()
    seen += proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL
    assert "Epoch: [1] Total time" not in seen, "the kill came after epoch 1 had ended"
    assert checkpoint_files(out_dir) == ["checkpoint-0.pth", "checkpoint-last.pth"]
    assert load(last)["epoch"] == 0 and read_log(out_dir) == read_log(reference)[:1]

    # 2. SIGTERM mid-epoch (Slurm preemption): the current state is saved, then the process exits with 128 + 15
    proc = start("main_pretrain.py", *flags)
    seen = wait_for(proc, EPOCH_1_STARTED)
    assert f"Auto-resuming from {last}" in seen and "continuing at epoch 1" in seen
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]
    stopped = re.search(r"Stopped by SIGTERM at epoch 1, step (\d+) \(mid-epoch\); saved (\S+)\.", err)
    assert stopped and "Traceback" not in err, err[-4000:]
    step = int(stopped.group(1))
    assert 1 < step < STEPS and stopped.group(2) == str(last)
    checkpoint = load(last)
    assert checkpoint["epoch"] == 1 and checkpoint[PROGRESS_KEY]["step"] == step
    assert len(read_log(out_dir)) == 1
    stopped_state = sha256(last)

    # 3. SIGKILL half-way through writing the checkpoint of epoch 1: the mid-epoch one stays the latest
    proc = subprocess.run(
        [sys.executable, "-c", DIE_WHILE_SAVING, *command("main_pretrain.py", *flags)[1:]],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert f"Continuing epoch 1 at step {step}" in proc.stdout and "Epoch: [1] Total time" in proc.stdout
    half_written = out_dir / "checkpoint-last.pth.tmp"
    assert half_written.stat().st_size > 0
    with pytest.raises(CheckpointError):
        load_checkpoint(str(half_written))
    assert find_latest_checkpoint(str(out_dir)) == str(last) and sha256(last) == stopped_state

    # 4. the last rerun finishes epoch 1 from the step the SIGTERM stopped at
    resumed = run("main_pretrain.py", *flags)
    assert f"Continuing epoch 1 at step {step}" in resumed.stdout
    assert read_log(out_dir) == read_log(reference)
    assert_same_weights(last, reference / "checkpoint-last.pth")
    assert checkpoint_files(out_dir) == ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"]


def test_sigusr1_to_the_process_group_saves_a_checkpoint(ihc, reference, tmp_path):
    """SIGUSR1 (``sbatch --signal=USR1@...``) sent, as Slurm does, to every process of the job step: the
    DataLoader workers ignore it and the main process saves a mid-epoch checkpoint."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.copy(reference / "checkpoint-0.pth", out_dir / "checkpoint-last.pth")
    proc = start("main_pretrain.py", *pretrain_flags(ihc, out_dir, workers=2), "--auto_resume")
    wait_for(proc, EPOCH_1_STARTED)
    os.killpg(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-4000:]
    assert "Received SIGUSR1: saving a checkpoint after the current step" in err
    stopped = re.search(r"Stopped by SIGUSR1 at epoch 1, step (\d+) \(mid-epoch\)", err)
    assert stopped and "Traceback" not in err, err[-4000:]
    checkpoint = load(out_dir / "checkpoint-last.pth")
    assert checkpoint["epoch"] == 1 and checkpoint[PROGRESS_KEY]["step"] == int(stopped.group(1))


# ----------------------------------------------------------------------------------------------- output


@pytest.mark.parametrize("flag", ["--output_dir", "--log_dir"])
def test_output_under_a_file_fails_before_training(flag, ihc, tmp_path, cli):
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "out"
    code, out = cli("main_pretrain.py", *pretrain_flags(ihc, tmp_path / "out"), flag, target)
    assert str(code).startswith(f"ERROR: {flag} {target} is not a writable directory: [Errno 20] Not a directory")
    assert "train:" not in out and "Start training" not in out


def test_read_only_output_dir_fails_before_training(ihc, tmp_path, cli):
    if os.geteuid() == 0:
        pytest.skip("root may write into a mode 0o500 directory; test_output_under_a_file_* covers the check")
    target = tmp_path / "read_only"
    target.mkdir(mode=0o500)
    try:
        code, out = cli("main_pretrain.py", *pretrain_flags(ihc, target))
    finally:
        target.chmod(0o700)
    assert str(code).startswith(f"ERROR: --output_dir {target} is not a writable directory: [Errno 13]")
    assert "Start training" not in out


def test_a_run_owns_its_output_dir(ihc, tmp_path, cli):
    """Before: a second run on the same --output_dir and a rerun without --auto_resume both exited 0, the first
    interleaving its epochs with the running one in log.txt, the second appending to it. Now the second run is
    refused with the owner's PID, the owner's SIGKILL leaves no stale lock, and a rerun must say --auto_resume."""
    out_dir = tmp_path / "out"
    flags = pretrain_flags(ihc, out_dir)
    owner = start("main_pretrain.py", *flags, "--epochs", "50")
    wait_for(owner, EPOCH_1_STARTED)
    code, out = cli("main_pretrain.py", *flags)
    assert code == (
        f"ERROR: --output_dir {out_dir} is in use by another run: PID {owner.pid} on {socket.gethostname()} "
        f"holds {out_dir / LOCK_FILENAME}. Wait for it to end, or choose another --output_dir"
    )
    assert "train:" not in out
    owner.kill()
    owner.communicate(timeout=60)
    code, out = cli("main_pretrain.py", *flags, "--auto_resume")
    assert code == 0 and "continuing at epoch 1" in out
    assert [entry["epoch"] for entry in read_log(out_dir)] == [0, 1]

    code, out = cli("main_pretrain.py", *flags)
    assert code == (
        f"ERROR: --output_dir {out_dir} holds an earlier run (checkpoint-0.pth, checkpoint-1.pth, "
        "checkpoint-last.pth, log.txt); pass --auto_resume to continue it, or choose another (or an empty) --output_dir"
    )
    assert "train:" not in out and len(read_log(out_dir)) == 2


def test_output_dir_lock_dies_with_its_process_not_its_children(tmp_path):
    """A process that locked --output_dir is SIGKILLed while a child it forked lives on (as DataLoader workers do
    for a moment): the lock is free at once."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK_FORK_AND_DIE, str(tmp_path)],
        cwd=REPO,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    assert proc.wait(timeout=60) == -signal.SIGKILL
    try:
        lock_output_dir(str(tmp_path))
        assert (tmp_path / LOCK_FILENAME).read_text() == f"PID {os.getpid()} on {socket.gethostname()}\n"
    finally:
        release_output_dir()
        proc.stdin.close()  # ends the child


def test_disk_full_at_save_keeps_previous_checkpoint(ihc, reference, tmp_path, cli):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to make writes fail with ENOSPC")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.copy(reference / "checkpoint-0.pth", out_dir / "checkpoint-last.pth")
    before = sha256(out_dir / "checkpoint-last.pth")
    tmp = out_dir / "checkpoint-last.pth.tmp"
    tmp.symlink_to("/dev/full")  # the next checkpoint is written through it: the disk is full

    code, out = cli("main_pretrain.py", *pretrain_flags(ihc, out_dir), "--auto_resume")
    assert "continuing at epoch 1" in out and "Epoch: [1] Total time" in out
    assert code == (
        f"ERROR: could not save the checkpoint of epoch 1: [Errno 28] No space left on device: '{tmp}'. "
        f"The checkpoints already in {out_dir} are intact; free some space (or fix --output_dir) and continue "
        "with --auto_resume"
    )
    assert sha256(out_dir / "checkpoint-last.pth") == before
    assert not os.path.lexists(tmp) and checkpoint_files(out_dir) == ["checkpoint-last.pth"]
    assert not os.path.exists(out_dir / "log.txt")


# ----------------------------------------------------------------------------------------------- bad data


def test_corrupt_image_is_named_or_skipped_and_counted(digits, tmp_path, cli):
    root = tmp_path / "data"
    os.makedirs(root / "train")
    shutil.copy(digits / "channel_stats.json", root)
    for i, path in enumerate(sorted((digits / "train").glob("*/*.png"))[:15]):
        shutil.copy(path, root / "train" / f"{i:02d}.png")
    # intact header and end, garbled compressed pixels: only decoding finds it, in a DataLoader worker
    garbled = root / "train" / "garbled.png"
    data = bytearray((root / "train" / "00.png").read_bytes())
    start = data.index(b"IDAT") + 6
    data[start : start + 200] = bytes(b ^ 0x5A for b in data[start : start + 200])
    garbled.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    flags = ["--data_path", root, "--output_dir", out_dir, "--epochs", "1", "--batch_size", "4"]
    flags += ["--num_workers", "1", *TINY_MAE]

    code, out = cli("main_pretrain.py", *flags)
    assert str(code).startswith(f"ERROR: cannot read {garbled}: OSError: broken data stream"), code
    assert "Traceback" not in str(code) and "Start training" in out
    # the worker has been shut down; left alive, it would make the interpreter's exit wait for ever
    assert not multiprocessing.active_children()

    truncated = root / "train" / "truncated.png"
    truncated.write_bytes((root / "train" / "01.png").read_bytes()[:-30])
    code, out = cli("main_pretrain.py", *flags)
    assert code == f"ERROR: {truncated} is truncated: it does not end with a PNG IEND chunk"
    assert "Start training" not in out

    code, out = cli("main_pretrain.py", *flags, "--skip_bad_samples")
    assert code == 0
    assert "train: 16 samples" in out  # 17 files, the truncated one left out
    (entry,) = read_log(out_dir)
    assert entry["skipped_files"] == 1 and entry["replaced_samples"] == 1


@pytest.mark.parametrize(
    "case, shape, dtype, expected",
    [
        ("channels", (2, 32, 32), np.float32, "{odd} has 2 channels but {first} has 1; every sample needs"),
        ("size", (1, 40, 40), np.float32, "{odd} is 40x40 but {first} is 32x32; pass --allow_mixed_sizes"),
        ("dtype", (1, 32, 32), np.complex64, "{odd} has pixels of dtype complex64; expected bool, integer or"),
        ("in_chans", None, None, "--in_chans 3 does not match the data: 1 of 1 channels are used ({first} has 1)"),
    ],
)
def test_mismatched_sample_is_named_before_training(case, shape, dtype, expected, tmp_path, cli):
    root = tmp_path / "data"
    first = write_npy_folder(root, 8)[0]
    odd = root / "odd.npy"
    if shape is not None:
        np.save(odd, np.ones(shape, dtype=dtype))
    flags = ["--data_path", root, "--output_dir", tmp_path / "out", "--mean", "0", "--std", "1", *TINY_MAE]
    if case == "in_chans":
        flags += ["--in_chans", "3"]
    code, out = cli("main_pretrain.py", *flags)
    assert str(code).startswith("ERROR: " + expected.format(odd=odd, first=first)), code
    assert "Start training" not in out


def test_nan_loss_names_epoch_and_first_bad_step(tmp_path, cli):
    root, out_dir, batch_size = tmp_path / "data", tmp_path / "out", 4
    write_npy_folder(root, 32)
    flags = ["--data_path", root, "--output_dir", out_dir, "--mean", "0", "--std", "1", "--print_freq", "100"]
    flags += ["--batch_size", batch_size, "--num_workers", "0", *TINY_MAE]
    assert cli("main_pretrain.py", *flags, "--epochs", "1")[0] == 0
    before = sha256(out_dir / "checkpoint-last.pth")

    # pixels that are finite but overflow float32 in the model, in the second sample of step 2 of epoch 1 (the
    # order the training sampler draws); NaN pixels would be named when read (test_nan_pixels_name_the_file)
    dataset = build_pretrain_dataset(argparse.Namespace(data_path=str(root), input_size=32, mean=[0], std=[1]))
    sampler = EpochSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(1)
    victim = dataset.samples[list(sampler)[2 * batch_size + 1]][0]
    np.save(victim, np.full((1, 32, 32), 1e30, dtype=np.float32))

    code, out = cli("main_pretrain.py", *flags, "--epochs", "3", "--auto_resume")
    assert code == (
        "ERROR: Loss is not finite at epoch 1, step 2; stopping training. "
        "The last checkpoint written before this epoch is left as it was."
    )
    assert "Epoch: [1] [0/8]" in out  # logged fine; the NaN of step 2 is found at the next logging step (7)
    assert sha256(out_dir / "checkpoint-last.pth") == before
    assert checkpoint_files(out_dir) == ["checkpoint-0.pth", "checkpoint-last.pth"]
    assert [entry["epoch"] for entry in read_log(out_dir)] == [0]


def test_nan_pixels_name_the_file(tmp_path, cli):
    """Before: 'Loss is not finite at epoch 0, step 1', naming no file. The pixels are checked where they are
    read, here in a DataLoader worker; --nan_fill replaces them."""
    root = tmp_path / "data"
    victim = write_npy_folder(root, 16)[5]
    pixels = np.load(victim)
    pixels[0, 3, 4] = np.nan
    np.save(victim, pixels)
    flags = ["--data_path", root, "--mean", "0", "--std", "1", "--epochs", "1", "--batch_size", "4"]
    flags += ["--num_workers", "1", *TINY_MAE]
    code, out = cli("main_pretrain.py", *flags, "--output_dir", tmp_path / "strict")
    assert code == (
        f"ERROR: {victim} has 1 NaN or infinite pixel values (of 1024); pass --nan_fill VALUE to replace them, "
        "or --skip_bad_samples to leave the sample out (in DataLoader worker process 0)"
    )
    assert "Start training" in out and not multiprocessing.active_children()
    code, _ = cli("main_pretrain.py", *flags, "--output_dir", tmp_path / "filled", "--nan_fill", "0")
    assert code == 0 and np.isfinite(read_log(tmp_path / "filled")[0]["train_loss"])


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "script, flags, expected",
    [
        (
            "main_pretrain.py",
            ["--resume", "{ckpt}", "--data_path", "{digits}"],
            [
                "(ChannelMaskedAutoencoderViT):",
                "shape mismatches:\n    channel_embed: checkpoint (6, 64), model (1, 64)",
            ],
        ),
        (
            "main_pretrain.py",
            ["--resume", "{ckpt}", "--input_size", "48"],
            ["pos_embed: checkpoint (1, 17, 64), model (1, 37, 64)"],
        ),
        (
            "main_finetune.py",
            ["--finetune", "{ckpt}", "--model_kwargs", "embed_dim=32", "depth=1", "num_heads=2"],
            ["shape mismatches (first 10 shown):", "cls_token: checkpoint (1, 1, 64), model (1, 1, 32)"],
        ),
    ],
    ids=[
        "pretrain-resume-other-channels",
        "pretrain-resume-other-input-size",
        "finetune-from-other-width",
    ],
)
def test_checkpoint_of_another_model_lists_mismatches(script, flags, expected, ihc, digits, reference, tmp_path, cli):
    ckpt = reference / "checkpoint-last.pth"
    data = (
        ["--data_path", ihc, "--batch_size", "4", *TINY_MAE]
        if script == "main_pretrain.py"
        else ["--data_path", digits, *TINY_VIT]
    )
    flags = [flag.format(ckpt=ckpt, digits=digits) for flag in flags]
    code, out = cli(script, *data, "--output_dir", tmp_path / "out", "--epochs", "1", *flags)
    assert str(code).startswith(f"ERROR: {ckpt} does not fit the model"), code
    for item in expected:
        assert item in code
    assert "Start training" not in out


@pytest.mark.parametrize("script, flag", [("main_pretrain.py", "--resume"), ("main_finetune.py", "--finetune")])
def test_untrusted_checkpoint_needs_unsafe_load(script, flag, ihc, digits, reference, tmp_path, cli):
    marker = tmp_path / "payload-ran"
    checkpoint = load(reference / "checkpoint-0.pth")
    checkpoint["note"] = Payload(marker)
    untrusted = tmp_path / "untrusted.pth"
    torch.save(checkpoint, untrusted)
    data = (
        ["--data_path", ihc, "--batch_size", "4", *TINY_MAE]
        if script == "main_pretrain.py"
        else ["--data_path", digits, *TINY_VIT]
    )
    flags = [*data, "--output_dir", tmp_path / "out", "--epochs", "2", flag, untrusted]

    code, out = cli(script, *flags)
    assert code == (
        f"ERROR: {untrusted} holds objects other than tensors and plain values (it contains a pickled os.makedirs), "
        "so torch.load(weights_only=True) refused it: unpickling them could run arbitrary code. "
        "If you trust the file, pass --unsafe_load"
    )
    assert not marker.exists() and "Start training" not in out

    code, out = cli(script, *flags, "--unsafe_load")
    assert code == 0 and marker.is_dir()  # the planted code ran: why it takes a flag
    assert ("continuing at epoch 1" if flag == "--resume" else "Load pre-trained checkpoint") in out
    assert load(tmp_path / "out" / "checkpoint-last.pth")["epoch"] == 1  # what we write stays plain


# ----------------------------------------------------------------------------------------------- too little data


def test_too_little_data_is_an_error(ihc, digits, tmp_path, cli):
    flags = ["--data_path", ihc, "--output_dir", tmp_path / "out", "--num_workers", "0", *TINY_MAE]
    code, _ = cli("main_pretrain.py", *flags, "--batch_size", "1000")
    assert code == (
        f"ERROR: {IHC_TILES} training samples give no full batch of --batch_size 1000 per process on 1 process(es); "
        "lower --batch_size"
    )
    code, _ = cli("main_pretrain.py", *flags, "--batch_size", "8", "--accum_iter", "6")
    assert code == (
        f"ERROR: an epoch has 5 batches of --batch_size 8 ({IHC_TILES} samples, 1 process(es)), fewer than "
        "--accum_iter 6: no optimizer step would be taken"
    )


def test_empty_split_is_an_error(digits, tmp_path, cli):
    root = tmp_path / "data"
    shutil.copytree(digits / "train", root / "train")
    for label in os.listdir(digits / "val"):
        os.makedirs(root / "val" / label)
    code, out = cli("main_finetune.py", "--data_path", root, "--output_dir", tmp_path / "out", *TINY_VIT)
    assert str(code).startswith(f"ERROR: --data_path {root} (val split): no readable image files"), code
    assert "Start training" not in out


# ----------------------------------------------------------------------------------------------- checkpoint arguments


def test_head_count_of_the_checkpoint_is_kept_or_a_mismatch_refused(ihc, digits, tmp_path, cli):
    """num_heads does not show in the weights: a checkpoint pretrained with 4 heads does not go into a 3-head model
    (the real command lines, one ERROR line, no traceback); without the flag the model gets the checkpoint's 4."""
    width = ["--model_kwargs", "embed_dim=48", "depth=1"]
    decoder = ["decoder_embed_dim=32", "decoder_depth=1", "decoder_num_heads=2"]
    pretrain = ["--data_path", ihc, "--output_dir", tmp_path / "pretrain", "--epochs", "1", "--batch_size", "8"]
    pretrain += ["--num_workers", "0", "--vis_every", "0", "--input_size", "32", "--patch_size", "8"]
    run("main_pretrain.py", *pretrain, *width, "num_heads=4", *decoder)
    ckpt = tmp_path / "pretrain" / "checkpoint-last.pth"
    finetune = ["--data_path", digits, "--finetune", ckpt, "--output_dir", tmp_path / "ft", "--epochs", "1"]
    finetune += ["--batch_size", "10", "--num_workers", "0"]

    proc = run("main_finetune.py", *finetune, *width, "num_heads=3", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"ERROR: {ckpt} was trained with num_heads=4 (--model_kwargs num_heads=4) but the model to build has "
        "num_heads=3 (--model_kwargs num_heads=3)"
    )
    assert "Start training" not in proc.stdout

    code, out = cli("main_finetune.py", *finetune, *width)
    assert code == 0
    taken = f"From the checkpoint {ckpt}: --model channelvit_tiny_patch16 --model_kwargs num_heads=4 --input_size 32"
    assert taken in out
    assert "num_heads=4" in load(tmp_path / "ft" / "checkpoint-last.pth")["args"]["model_kwargs"]


@pytest.mark.parametrize("script", ["main_finetune.py", "main_linprobe.py"])
def test_eval_without_a_checkpoint_is_refused(script, digits, tmp_path, cli):
    code, out = cli(script, "--eval", "--data_path", digits, "--output_dir", "", *TINY_VIT)
    assert code == (
        "ERROR: --eval scores a checkpoint, and none was given: pass --resume CHECKPOINT (--finetune only initialises "
        "training)"
    )
    assert "train:" not in out and "Accuracy" not in out


def other_dataset(digits, root):
    """Another 1-channel, 10-class dataset: the digits inverted, each label moved to the next class, with its own
    channel_stats.json."""
    for split in ("train", "val"):
        for label in os.listdir(digits / split):
            target = root / split / str((int(label) + 1) % 10)
            os.makedirs(target)
            for name in os.listdir(digits / split / label):
                image = np.asarray(Image.open(digits / split / label / name))
                Image.fromarray(255 - image).save(target / name)
    (root / "channel_stats.json").write_text(json.dumps({"mean": [177.0], "std": [84.0]}))
    return root


def test_eval_scores_the_checkpoint_on_what_it_was_trained_with(digits, tmp_path, cli):
    """``--eval --resume CKPT`` alone: the checkpoint's data path, channels, input size, normalisation (recorded in
    the checkpoint: the statistics file is gone by then), model and pooling, each logged as taken from it; a flag
    given on the command line wins."""
    other, ckpt = other_dataset(digits, tmp_path / "other"), tmp_path / "ft" / "checkpoint-last.pth"
    train = ["--data_path", other, "--channels", "0", "--input_size", "48", "--patch_size", "8", "--cls_token"]
    train += ["--model_kwargs", "embed_dim=64", "depth=1", "num_heads=2", "--batch_size", "10", "--num_workers", "0"]
    assert cli("main_finetune.py", *train, "--epochs", "1", "--output_dir", tmp_path / "ft")[0] == 0
    (logged,) = read_log(tmp_path / "ft")
    os.remove(other / "channel_stats.json")

    code, out = cli("main_finetune.py", "--eval", "--resume", ckpt, "--output_dir", "", "--num_workers", "0")
    assert code == 0
    assert (
        f"From the checkpoint {ckpt}: --model channelvit_tiny_patch16 --model_kwargs embed_dim=64 depth=1 num_heads=2 "
        f"--input_size 48 --patch_size 8 --data_path {other} --channels 0 --global_pool False"
    ) in out
    assert "val: 20 samples, channels [0], 10 classes, normalised with the checkpoint's statistics" in out
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["test_acc1"] == logged["test_acc1"] and stats["test_loss"] == pytest.approx(logged["test_loss"])

    code, out = cli("main_finetune.py", "--eval", "--resume", ckpt, "--output_dir", "", "--data_path", digits)
    assert code == 0 and f"From the command line: --data_path {digits}" in out
    assert f"val: 20 samples, channels [0], 10 classes, normalised with {digits / 'channel_stats.json'}" in out


@pytest.mark.parametrize("recorded", [True, False], ids=["ours", "published-format"])
def test_finetune_builds_at_the_checkpoints_input_size(recorded, digits, tmp_path, cli):
    """A 64 px checkpoint fine-tunes at 64 px without --input_size (its args, else its position embedding's grid),
    and data without statistics take those the checkpoint recorded."""
    encoder = dict(embed_dim=64, depth=1, num_heads=2)
    pretrained = models_chamae.create_model(
        "chamae_vit_tiny_patch16", img_size=64, patch_size=8, in_chans=1, num_channels=1, **encoder,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    )  # fmt: skip
    normalization = dict(num_channels=1, channels=[0], dtypes=["uint8"], mean=[70.0], std=[80.0])
    args = dict(model="chamae_vit_tiny_patch16", input_size=64, patch_size=8, normalization=normalization)
    args["model_kwargs"] = [f"{k}={v}" for k, v in encoder.items()]
    torch.save({"model": pretrained.state_dict(), **({"args": args} if recorded else {})}, tmp_path / "mae.pth")
    data = tmp_path / "data"
    shutil.copytree(digits, data, ignore=shutil.ignore_patterns("channel_stats.json"))
    flags = ["--data_path", data, "--finetune", tmp_path / "mae.pth", "--output_dir", tmp_path / "ft"]
    flags += ["--epochs", "1", "--batch_size", "10", "--num_workers", "0"]
    flags += [] if recorded else ["--model_kwargs", *args["model_kwargs"]]

    code, out = cli("main_finetune.py", *flags)
    assert code == 0
    assert re.search(rf"From the checkpoint {tmp_path / 'mae.pth'}: .*--input_size 64", out)
    assert "resampled" not in out
    assert load(tmp_path / "ft" / "checkpoint-last.pth")["model"]["pos_embed"].shape == (1, 1 + 8 * 8, 64)
    source = "the checkpoint's statistics" if recorded else "mean/std estimated from training samples"
    assert f"train: 40 samples, channels [0], 10 classes, normalised with {source}" in out


def test_pretrained_encoder_of_another_family_or_depth_is_refused():
    """Keys the loader used to let go: channel embeddings into a ViT, blocks beyond the model's depth."""
    shape = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2)
    vit = models_vit.create_model("vit_tiny_patch16", in_chans=1, num_classes=10, depth=1, **shape)
    channel_mae = models_chamae.create_model("chamae_vit_tiny_patch16", in_chans=1, depth=1, **shape)
    with pytest.raises(CheckpointMismatchError, match="chamae.pth holds a ChannelMAE / ChannelViT encoder"):
        models_checkpoint.load_pretrained(vit, channel_mae.state_dict(), "chamae.pth")
    deeper = models_mae.create_model("mae_vit_tiny_patch16", in_chans=1, depth=2, **shape)
    with pytest.raises(CheckpointMismatchError, match=r"deeper.pth does not fit[\s\S]*unexpected keys"):
        models_checkpoint.load_pretrained(vit, deeper.state_dict(), "deeper.pth")


# ----------------------------------------------------------------------------------------- flags that would be ignored


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--decode_ratio", "0.5"],
            "--decode_ratio 0.5 needs --decoder cross; the full decoder decodes every masked token",
        ),
        (
            ["--mask_mode", "channel", "--mask_ratio", "0"],
            "--mask_ratio 0.0 must be > 0 and < 1: 0 masks no token and --mask_mode channel hides no channel, so "
            "nothing is reconstructed; 1 leaves no token visible",
        ),
        (
            ["--model", "mae_vit_tiny_patch16", "--mask_mode", "spatial", "--hcs"],
            "--mask_mode spatial and --hcs need a chamae_* model; mae_vit_tiny_patch16 masks whole patches",
        ),
    ],
    ids=["decode_ratio", "channel_mask_ratio_0", "mae_channel_flags"],
)
def test_ignored_pretrain_flags_are_errors_before_data_are_read(flags, message, tmp_path, cli):
    code, out = cli("main_pretrain.py", "--data_path", tmp_path / "absent", "--output_dir", tmp_path / "out", *flags)
    assert code == f"ERROR: {message}"
    assert not (tmp_path / "out").exists()


def test_channel_masking_of_one_channel_is_an_error(digits, tmp_path, cli):
    flags = ["--data_path", digits, "--output_dir", tmp_path / "out", "--mask_mode", "channel", *TINY_MAE]
    code, out = cli("main_pretrain.py", *flags)
    assert code == f"ERROR: --mask_mode channel needs at least 2 channels; the data have 1 ({digits})"
    assert "Model = " not in out
