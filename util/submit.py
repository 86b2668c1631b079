"""Submitting main_pretrain / main_finetune / main_linprobe to Slurm with submitit, with requeue on preemption.

``submitit_pretrain.py``, ``submitit_finetune.py`` and ``submitit_linprobe.py`` are thin wrappers around
``parse_args`` and ``submit`` here. The job runs ``<main module>.main(args)`` in every task; ``util.distributed``
picks rank, world size and the rendezvous address up from the Slurm environment.

Paths: ``--job_dir`` (default ``./job_dir/%j``) holds submitit's files and the task logs; ``--output_dir`` and
``--log_dir`` default to it. ``%j`` in any of the three becomes the Slurm job id inside the job, which stays the
same when Slurm requeues a job, so a requeued job finds its own checkpoints. Under ``--cluster local`` it becomes
``local-<date>-<time>-<submitting PID>`` at submission.

Requeue: on the pre-timeout/preemption signal (SIGUSR2, ``--signal_delay_s`` before the time limit) submitit
calls ``Trainer.checkpoint``, which returns a fresh ``Trainer`` whose args resume from the newest checkpoint in
the output dir, and requeues the job (at most ``--max_num_timeout`` times for time-outs). Independently, a job
requeued by Slurm itself (``scontrol requeue``, node failure) starts from the submitted ``Trainer`` again, which
looks for the newest checkpoint in the output dir before training, so it also continues instead of starting over.
"""

import argparse
import copy
import importlib
import os
import shlex
import time

import submitit
import torch

from util.checkpoint import find_latest_checkpoint
from util.cli import end_loader_workers
from util.flags import ArgumentParser

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_PATH_ARGS = ("job_dir", "output_dir", "log_dir")


def get_submit_parser() -> argparse.ArgumentParser:
    """The Slurm flags shared by the three submitit scripts (a parent parser, no ``-h``)."""
    parser = argparse.ArgumentParser(add_help=False)
    g = parser.add_argument_group("Slurm / submitit")
    g.add_argument("--nodes", default=1, type=int, help="number of nodes")
    g.add_argument("--ngpus", default=8, type=int, help="GPUs per node, one task each; 0 = CPU tasks (gloo)")
    g.add_argument("--tasks_per_node", default=1, type=int, help="processes per node when --ngpus 0")
    g.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per task")
    g.add_argument("--mem_gb", default=None, type=float, help="memory per node (default 40 per GPU; 0 = don't ask)")
    g.add_argument("--timeout", default=4320, type=int, help="time limit of one job in minutes")
    g.add_argument("--job_dir", default=os.path.join("job_dir", "%j"), type=str, help="submitit folder (%%j = job id)")
    g.add_argument("--partition", default=None, type=str, help="Slurm partition (default: the cluster's default)")
    g.add_argument("--account", default=None, type=str, help="Slurm account")
    g.add_argument("--qos", default=None, type=str, help="Slurm quality of service")
    g.add_argument("--constraint", default=None, type=str, help="Slurm node constraint, e.g. 'a100'")
    g.add_argument("--use_volta32", action="store_true", help="request 32GB V100s (adds constraint 'volta32gb')")
    g.add_argument("--comment", default=None, type=str, help="comment attached to the Slurm job")
    g.add_argument("--job_name", default=None, type=str, help="Slurm job name (default: the script's name)")
    g.add_argument("--signal_delay_s", default=120, type=int, help="seconds before the time limit to checkpoint")
    g.add_argument("--max_num_timeout", default=3, type=int, help="how many times a timed-out job is requeued")
    g.add_argument(
        "--cluster",
        default=None,
        choices=["slurm", "local", "debug"],
        help="submitit executor (default: slurm where sbatch exists, else local; 'debug' runs in this process)",
    )
    return parser


def parse_args(main_parser: argparse.ArgumentParser, description: str, argv=None) -> argparse.Namespace:
    """Parse the flags of a main_* script plus the Slurm flags; ``--output_dir`` defaults to ``--job_dir``."""
    parser = ArgumentParser(description, parents=[main_parser, get_submit_parser()])
    parser.set_defaults(output_dir=None)
    return parser.parse_args(argv)


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else path


def resolve_job_paths(args: argparse.Namespace, job_id: str) -> argparse.Namespace:
    """A copy of ``args`` with ``%j`` replaced by ``job_id`` in ``job_dir``, ``output_dir`` and ``log_dir``."""
    args = copy.deepcopy(args)
    for name in JOB_PATH_ARGS:
        value = getattr(args, name, None)
        if value:
            setattr(args, name, value.replace("%j", str(job_id)))
    return args


class Trainer:
    """The submitted callable: runs ``main_module.main(args)`` in each task and requeues itself on preemption.

    ``args`` keeps ``%j`` unresolved and is never modified by a run (``main`` gets a resolved copy), so the
    checkpointed Trainer carries the user's flags plus only the resume settings.
    """

    def __init__(self, main_module: str, args: argparse.Namespace):
        self.main_module = main_module
        self.args = args
        self._output_dir = None

    def __call__(self):
        job_env = submitit.JobEnvironment()
        args = resolve_job_paths(self.args, job_env.job_id)
        self._output_dir = args.output_dir
        if not getattr(args, "eval", False):
            newest = find_latest_checkpoint(args.output_dir)
            if newest:
                args.resume = newest
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(int(threads))
        if job_env.global_rank == 0:
            print(f"{job_env}; output_dir {args.output_dir}; resume: {args.resume or 'no'}", flush=True)
        module = importlib.import_module(self.main_module)
        try:
            return module.main(args)
        finally:
            end_loader_workers()  # DataLoader workers of a failed epoch would block the task's exit

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2 (rank 0): a fresh Trainer resuming from the newest checkpoint."""
        args = copy.deepcopy(self.args)
        args.auto_resume = True
        newest = find_latest_checkpoint(self._output_dir) if self._output_dir else None
        if newest:
            args.resume = newest
        start = newest or args.resume or "scratch (no checkpoint yet)"
        print(f"Requeueing {self.main_module}; will resume from {start}", flush=True)
        return submitit.helpers.DelayedSubmission(Trainer(self.main_module, args))


def make_executor(args: argparse.Namespace, job_name: str) -> submitit.AutoExecutor:
    """A submitit executor for ``args``' Slurm flags (``--ngpus 0``: CPU tasks, ``--tasks_per_node`` of them)."""
    executor = submitit.AutoExecutor(
        folder=args.job_dir, cluster=args.cluster, slurm_max_num_timeout=args.max_num_timeout
    )
    tasks_per_node = args.ngpus if args.ngpus > 0 else args.tasks_per_node
    if executor.cluster != "slurm" and args.nodes * tasks_per_node > 1:
        raise SystemExit(
            f"the '{executor.cluster}' submitit executor runs a single process; use Slurm for "
            f"{args.nodes * tasks_per_node} tasks, or torchrun on one machine"
        )
    mem_gb = 40 * args.ngpus if args.mem_gb is None else args.mem_gb
    constraints = [c for c in (args.constraint, "volta32gb" if args.use_volta32 else None) if c]
    slurm = {
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_comment": args.comment,
        "slurm_constraint": "&".join(constraints) or None,
    }
    executor.update_parameters(
        name=args.job_name or job_name,
        nodes=args.nodes,
        tasks_per_node=tasks_per_node,
        gpus_per_node=args.ngpus,
        cpus_per_task=args.cpus_per_task,
        mem_gb=mem_gb or None,
        timeout_min=args.timeout,
        slurm_signal_delay_s=args.signal_delay_s,
        # the job unpickles util.submit.Trainer, so the repository must be importable wherever it was submitted
        slurm_setup=[f"export PYTHONPATH={shlex.quote(REPO_DIR)}${{PYTHONPATH:+:$PYTHONPATH}}"],
        **{k: v for k, v in slurm.items() if v},
    )
    return executor


def submit(main_module: str, args: argparse.Namespace) -> submitit.Job:
    """Submit ``main_module.main(args)``; returns the submitit job (``job.result()`` waits for it)."""
    args.job_dir = _absolute(args.job_dir)
    args.output_dir = args.job_dir if args.output_dir is None else _absolute(args.output_dir)
    args.log_dir = _absolute(args.log_dir)
    # the submitting machine may have no GPU, so the parser's default device says nothing about the nodes
    args.device = "cuda" if args.ngpus > 0 else "cpu"
    args.dist_url = "env://"
    job_name = main_module.replace("main_", "channelmae_")
    executor = make_executor(args, job_name)
    if executor.cluster == "local" and "%j" in args.job_dir:
        # submitit's local controller creates the job folder before the job id (its PID) exists, as a literal '%j'
        args = resolve_job_paths(args, f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        executor = make_executor(args, job_name)
    job = executor.submit(Trainer(main_module, args))
    folder = args.job_dir.replace("%j", str(job.job_id))
    print(f"Submitted job {job.job_id} ({executor.cluster}); logs in {folder}")
    if executor.cluster == "debug":
        job.result()  # the debug executor runs the job in this process, when its result is asked for
    return job
