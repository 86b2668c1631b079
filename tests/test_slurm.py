"""submitit launchers: Slurm parameters and the Trainer's resume logic without Slurm, then real jobs on a local
one-node Slurm (``bash scripts/start-local-slurm.sh``): a 2-task CPU pretraining job, a job requeued with
``scontrol requeue``, and a job that hits its time limit; both requeued jobs must continue from their checkpoint.

The ``slurm`` tests skip where ``sbatch`` is missing, where Slurm does not answer, or where Slurm's nodes are not
this machine (the job folders live in this machine's temporary directory).
"""

import builtins
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import read_log

import main_pretrain
from util import submit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MAE = [
    "--input_size", "32", "--patch_size", "8", "--batch_size", "8", "--num_workers", "0",
    "--model_kwargs", "embed_dim=32", "depth=1", "num_heads=2", "decoder_embed_dim=32", "decoder_depth=1",
    "decoder_num_heads=2",
]  # fmt: skip
CPU_TASKS = ["--ngpus", "0", "--tasks_per_node", "2", "--cpus_per_task", "1"]


def read_text(path) -> str:
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


# --------------------------------------------------------------------------------------------------------------
# without Slurm


def test_sbatch_parameters(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    flags = ["--job_dir", str(tmp_path / "%j"), "--cluster", "slurm", "--timeout", "60", "--partition", "p"]
    flags += ["--account", "acc", "--qos", "high", "--constraint", "a100", "--use_volta32", "--comment", "c"]

    args = submit.parse_args(main_pretrain.get_args_parser(), "t", [*flags, *CPU_TASKS, "--nodes", "2"])
    assert args.output_dir is None and args.log_dir is None
    text = submit.make_executor(args, "job")._executor._make_submission_file_text("python x.py", "uid")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=60",
        "--partition=p",
        "--account=acc",
        "--qos=high",
        "--comment=c",
        "--constraint='a100&volta32gb'",
        "--signal=USR2@120",
        "--job-name=job",
    ):
        assert f"#SBATCH {line}\n" in text, line
    assert "--mem" not in text
    assert f"export PYTHONPATH={REPO}" in text

    args = submit.parse_args(main_pretrain.get_args_parser(), "t", ["--ngpus", "4", "--cluster", "slurm"])
    text = submit.make_executor(args, "job")._executor._make_submission_file_text("python x.py", "uid")
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=10", "--mem=160GB"):
        assert f"#SBATCH {line}\n" in text, line


def test_local_executor_refuses_several_tasks(tmp_path):
    args = submit.parse_args(main_pretrain.get_args_parser(), "t", [*CPU_TASKS, "--cluster", "local"])
    args.job_dir = str(tmp_path)
    with pytest.raises(SystemExit, match="single process"):
        submit.make_executor(args, "job")


def test_trainer_resolves_job_dir_and_checkpoint_resumes(tmp_path, monkeypatch):
    """In-process ('debug' executor): %j -> job id, output_dir defaults to the job folder, ``checkpoint()`` gives
    a Trainer that resumes from the newest checkpoint, and rerunning it under the same job id continues."""
    monkeypatch.setattr(builtins, "print", builtins.print)  # main() replaces print; restore it afterwards
    argv = ["--cluster", "debug", "--ngpus", "0", "--job_dir", str(tmp_path / "%j"), "--epochs", "1", *TINY_MAE]
    args = submit.parse_args(main_pretrain.get_args_parser(), "t", argv)
    job = submit.submit("main_pretrain", args)
    job.result()
    folder = tmp_path / job.job_id
    assert [entry["epoch"] for entry in read_log(folder)] == [0]

    trainer = job.submission().function
    assert trainer.args.output_dir == str(tmp_path / "%j"), "the submitted args stay unresolved and unmodified"
    assert trainer.args.resume == "" and trainer.args.lr is None
    requeued = trainer.checkpoint().function
    assert isinstance(requeued, submit.Trainer) and requeued is not trainer
    assert requeued.args.resume == str(folder / "checkpoint-last.pth") and requeued.args.auto_resume

    requeued.args.epochs = 2
    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", job.job_id)
    requeued()
    assert [entry["epoch"] for entry in read_log(folder)] == [0, 1]


# --------------------------------------------------------------------------------------------------------------
# a real Slurm


def _slurm_skip_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found (start a local Slurm with: bash scripts/start-local-slurm.sh)"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"Slurm does not answer: {err}"
    if nodes.returncode != 0:
        return f"Slurm does not answer: {nodes.stderr.strip()}"
    host = socket.gethostname().split(".")[0]
    if host not in nodes.stdout.split():
        return f"Slurm's nodes are not this machine ({host}); the tests need a local one-node Slurm"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def jobs():
    """Job ids submitted by a test; whatever is still queued or running at the end is cancelled."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], capture_output=True)


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(condition, timeout: float, what: str, job_id: str, folder):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    info = job_info(job_id)
    logs = read_text(os.path.join(folder, f"{job_id}_0_log.out"))[-3000:]
    logs += read_text(os.path.join(folder, f"{job_id}_0_log.err"))[-3000:]
    pytest.fail(f"timed out after {timeout} s waiting for {what}; job {job_id}: {info.get('JobState')} "
                f"({info.get('Reason')}), restarts {info.get('Restarts')}\n{logs}")  # fmt: skip


def state(job_id: str) -> str:
    return job_info(job_id).get("JobState", "")


def release_when_requeued(job_id: str, folder):
    """Wait for the job to be back in the queue after a requeue, then lift the requeue delay (StartTime=now)."""
    wait_for(
        lambda: state(job_id) == "PENDING" and int(job_info(job_id).get("Restarts", 0)) >= 1,
        120,
        "the requeued job to be pending",
        job_id,
        folder,
    )
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, capture_output=True)


def submit_pretrain(tmp_path, monkeypatch, jobs, *flags) -> tuple[str, str]:
    """Submit a 2-task CPU pretraining job in-process; returns (job id, job folder)."""
    monkeypatch.setattr(builtins, "print", builtins.print)
    argv = [*CPU_TASKS, "--job_dir", str(tmp_path / "%j"), "--cluster", "slurm", *TINY_MAE, *flags]
    job = submit.submit("main_pretrain", submit.parse_args(main_pretrain.get_args_parser(), "t", argv))
    jobs.append(job.job_id)
    return job.job_id, str(tmp_path / job.job_id)


@pytest.mark.slurm
def test_submitit_pretrain_requeued_job_resumes_and_finishes(slurm, jobs, tmp_path):
    """submitit_pretrain.py, 2 CPU tasks: requeued (``scontrol requeue``) after two epochs, the job continues from
    its checkpoint, finishes, and only rank 0 wrote checkpoints and logs, with the lr scaled for 2 processes."""
    epochs = 12
    cmd = [sys.executable, "submitit_pretrain.py", *CPU_TASKS, "--timeout", "10"]
    cmd += ["--job_dir", str(tmp_path / "%j"), "--epochs", str(epochs), *TINY_MAE]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"Submitted job (\S+)", out.stdout).group(1)
    jobs.append(job_id)
    folder = str(tmp_path / job_id)

    wait_for(lambda: len(read_log(folder)) >= 2, 180, "two epochs", job_id, folder)
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)
    release_when_requeued(job_id, folder)
    wait_for(lambda: state(job_id) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", ""), 180,
             "the requeued job to finish", job_id, folder)  # fmt: skip
    assert state(job_id) == "COMPLETED", read_text(os.path.join(folder, f"{job_id}_0_log.err"))[-3000:]

    rank0_out = read_text(os.path.join(folder, f"{job_id}_0_log.out"))
    assert rank0_out.count("Starting with JobEnvironment") == 2
    (resumed_at,) = re.findall(r"continuing at epoch (\d+)", rank0_out)
    assert int(resumed_at) >= 2
    done = [entry["epoch"] for entry in read_log(folder)]
    assert done == sorted(set(done)) and done[-1] == epochs - 1, f"epochs repeated or missing: {done}"

    assert len([name for name in os.listdir(folder) if name.startswith("events.out.tfevents")]) == 2  # one a run
    checkpoint = torch.load(os.path.join(folder, "checkpoint-last.pth"), map_location="cpu", weights_only=True)
    args = checkpoint["args"]
    assert checkpoint["epoch"] == epochs - 1 and args["output_dir"] == folder and args["device"] == "cpu"
    assert (args["world_size"], args["rank"], args["dist_backend"]) == (2, 0, "gloo")
    assert args["lr"] == pytest.approx(args["blr"] * 8 * 2 / 256)
    for rank in (0, 1):
        assert os.path.exists(os.path.join(folder, f"{job_id}_{rank}_result.pkl"))
    assert "Averaged stats" not in read_text(os.path.join(folder, f"{job_id}_1_log.out")), "rank 1 prints nothing"


@pytest.mark.slurm
def test_timed_out_job_checkpoints_requeues_and_resumes(slurm, jobs, tmp_path, monkeypatch):
    """1-minute limit; Slurm sends SIGUSR2 15 s before it, submitit calls Trainer.checkpoint and requeues."""
    flags = ["--epochs", "1000", "--timeout", "1", "--signal_delay_s", "15"]
    job_id, folder = submit_pretrain(tmp_path, monkeypatch, jobs, *flags)
    release_when_requeued(job_id, folder)
    log_out = os.path.join(folder, f"{job_id}_0_log.out")
    wait_for(lambda: "continuing at epoch" in read_text(log_out), 120, "the job to resume", job_id, folder)
    subprocess.run(["scancel", job_id], check=True, capture_output=True)

    out = read_text(log_out)
    assert "this job is timed-out" in out
    assert f"will resume from {folder}/checkpoint-last.pth" in out
    (resumed_at,) = re.findall(r"continuing at epoch (\d+)", out)
    done = [entry["epoch"] for entry in read_log(folder)]
    assert int(resumed_at) > 0 and done == sorted(set(done)), done
