"""Multi-process training on the CPU with torchrun (gloo): pretraining, fine-tuning with --dist_eval, and a
single-process evaluation of the 2-process checkpoint. Also the single-process and torchrun branches of
``init_distributed_mode`` in-process."""

import argparse
import builtins
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import read_log

from util.cli import add_common_args
from util.distributed import cleanup_distributed, get_world_size, init_distributed_mode, is_dist_avail_and_initialized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_SIZE = 2
TINY_MAE = [
    "--input_size", "32", "--patch_size", "8", "--batch_size", "8", "--num_workers", "0",
    "--model_kwargs", "embed_dim=32", "depth=1", "num_heads=2", "decoder_embed_dim=32", "decoder_depth=1",
    "decoder_num_heads=2",
]  # fmt: skip
TINY_VIT = [
    "--input_size", "32", "--batch_size", "16", "--num_workers", "0",
    "--model_kwargs", "embed_dim=32", "depth=1", "num_heads=2",
]  # fmt: skip


def run(args: list[str], timeout: int = 300) -> str:
    """Run a command in the repository with one CPU thread per process; return stdout+stderr, fail on rc != 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed with {proc.returncode}:\n{out[-4000:]}"
    return out


def torchrun(script: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
    return run([*cmd, script, "--device", "cpu", *args])


def assert_written_by_rank0_only(output_dir, out: str, epochs: int):
    """One log line per epoch, one TensorBoard file, a checkpoint saved by rank 0 of 2, silent rank 1."""
    assert [entry["epoch"] for entry in read_log(output_dir)] == list(range(epochs))
    events = [name for name in os.listdir(output_dir) if name.startswith("events.out.tfevents")]
    assert len(events) == 1, events
    checkpoint = torch.load(os.path.join(output_dir, "checkpoint-last.pth"), map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == epochs - 1
    assert checkpoint["args"]["rank"] == 0 and checkpoint["args"]["world_size"] == WORLD_SIZE
    assert checkpoint["args"]["distributed"] is True and checkpoint["args"]["dist_backend"] == "gloo"
    assert len(checkpoint["rng"]) == WORLD_SIZE
    assert "| distributed init (rank 1/2)" in out
    assert out.count("Averaged stats:") == epochs, "only rank 0 prints training progress"
    return checkpoint


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(output dir, console output) of a 2-process ChannelMAE pretraining run of one epoch."""
    output_dir = tmp_path_factory.mktemp("torchrun_pretrain")
    out = torchrun("main_pretrain.py", "--epochs", "1", "--output_dir", str(output_dir), *TINY_MAE)
    return output_dir, out


def test_torchrun_pretrain(pretrained):
    output_dir, out = pretrained
    checkpoint = assert_written_by_rank0_only(output_dir, out, epochs=1)
    args = checkpoint["args"]
    # lr = blr * batch_size * accum_iter * world_size / 256
    assert args["lr"] == pytest.approx(args["blr"] * 8 * 1 * WORLD_SIZE / 256)
    assert re.search(r"effective batch size: 16\b", out)


def test_torchrun_finetune_then_single_process_eval(pretrained, tmp_path):
    pretrain_dir, _ = pretrained
    output_dir = tmp_path / "finetune"
    out = torchrun(
        "main_finetune.py",
        "--epochs", "1", "--dist_eval", "--output_dir", str(output_dir),
        "--finetune", str(pretrain_dir / "checkpoint-last.pth"), *TINY_VIT,
    )  # fmt: skip
    checkpoint = assert_written_by_rank0_only(output_dir, out, epochs=1)
    assert checkpoint["args"]["lr"] == pytest.approx(checkpoint["args"]["blr"] * 16 * WORLD_SIZE / 256)
    (stats,) = read_log(output_dir)
    n_val = sum(len(files) for _, _, files in os.walk(os.path.join(REPO, "sample_data", "digits", "val")))
    assert stats["test_n"] == n_val, "--dist_eval must score every validation image exactly once"

    out = run(
        [
            sys.executable, "main_finetune.py", "--device", "cpu", "--eval", "--output_dir", "",
            "--resume", str(output_dir / "checkpoint-last.pth"), *TINY_VIT,
        ]
    )  # fmt: skip
    assert "Not using distributed mode" in out
    single = json.loads(next(line for line in out.splitlines() if line.startswith('{"test_acc1"')))
    assert single["test_n"] == n_val
    # same weights, same images; batches differ between the sharded and the single-process run, so allow a
    # near-tie or two to flip
    assert single["test_acc1"] == pytest.approx(stats["test_acc1"], abs=200 / n_val)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_dist_env(monkeypatch):
    """No launcher variables; ``builtins.print`` restored afterwards (init_distributed_mode replaces it)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(builtins, "print", builtins.print)
    yield monkeypatch
    cleanup_distributed()


def make_args(**kwargs):
    parser = add_common_args(argparse.ArgumentParser())
    return parser.parse_args(["--device", "cpu"] + [f"--{k}={v}" for k, v in kwargs.items()])


def test_init_distributed_single_process(clean_dist_env):
    args = make_args()
    init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)
    assert not is_dist_avail_and_initialized()


def test_init_distributed_torchrun_env(clean_dist_env):
    clean_dist_env.setenv("RANK", "0")
    clean_dist_env.setenv("WORLD_SIZE", "1")
    clean_dist_env.setenv("LOCAL_RANK", "0")
    clean_dist_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_dist_env.setenv("MASTER_PORT", str(free_port()))
    args = make_args()
    init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.dist_backend) == (True, 0, 1, "gloo")
    assert is_dist_avail_and_initialized() and get_world_size() == 1
