"""Submit lknets training to SLURM through submitit, or run the same job on this machine.

The flags are main.py's plus the scheduler's, so the upstream commands run unchanged, e.g.
4 nodes x 8 GPUs for at most 3 days (``--timeout`` is in minutes):

    python run_with_submitit.py --nodes 4 --ngpus 8 --timeout 4320 --model RepLKNet-31B \
        --batch_size 64 --update_freq 2 --data_path /path/to/imagenet --job_dir /path/to/jobs

Every job gets a folder JOB_DIR/<job id> holding the scheduler's logs (one stdout/stderr pair per
process), the checkpoints, log.txt and tensorboard scalars (tb/). A job that SLURM pre-empts or
that reaches its time limit is requeued (up to 30 time-outs) and resumes from its newest
checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import getpass
import os
import shutil
import sys
from typing import Any, Dict, List, Optional

import submitit
import torch

import main
import utils
from utils import UserError, str2bool

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
CLUSTERS = ("slurm", "local", "debug")
MAX_NUM_TIMEOUT = 30  # requeues after a time-out before submitit gives up
SIGNAL_DELAY_S = 120  # SLURM warns the job this long before its time limit


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("lknets: train on SLURM through submitit",
                                     parents=[main.get_args_parser()])
    job = parser.add_argument_group("job (submitit)")
    job.add_argument("--nodes", default=2, type=int, help="number of nodes to request")
    job.add_argument("--ngpus", default=8, type=int,
                     help="GPUs per node; one training process per GPU")
    job.add_argument("--timeout", default=72 * 60, type=int,
                     help="time limit of one job, in minutes (the job requeues itself when hit)")
    job.add_argument("--partition", default=None, type=str,
                     help="SLURM partition (default: the cluster's default partition)")
    job.add_argument("--account", default=None, type=str, help="SLURM account, if given")
    job.add_argument("--qos", default=None, type=str, help="SLURM quality of service, if given")
    job.add_argument("--job_dir", default="", type=str,
                     help="where each job gets its folder JOB_DIR/<job id> (logs, checkpoints); "
                          "'%%j' in it stands for the job id (default: "
                          "./checkpoint/$USER/experiments)")
    job.add_argument("--job_name", default="", type=str, help="job name (default: the model)")
    job.add_argument("--comment", default="", type=str,
                     help="comment for the scheduler, e.g. a priority message")
    job.add_argument("--use_volta32", type=str2bool, nargs="?", const=True, default=False,
                     help="request 32GB V100s (SLURM constraint volta32gb)")
    job.add_argument("--mem", default=None, type=int,
                     help="memory per node in GB (default: 40 x --ngpus)")
    job.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per process")
    job.add_argument("--cluster", default=None, choices=CLUSTERS,
                     help="slurm (default where sbatch and srun are on PATH); local: the same "
                          "job on this machine, one process per --ngpus; debug: one process in "
                          "this interpreter, with pdb on errors")
    return parser


class Trainer:
    """What each process of the job runs: main.main with the job's distributed environment.

    Picklable (submitit sends it to the job); checkpoint() is what submitit calls when SLURM
    pre-empts the job or warns of its time limit.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> Dict[str, Any]:
        job_id = str(submitit.JobEnvironment().job_id)
        for name in ("output_dir", "log_dir"):
            value = getattr(self.args, name)
            if value:
                setattr(self.args, name, value.replace("%j", job_id))
        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for main's env:// initialisation. All of
        # the node's GPUs stay visible: main selects cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                              overwrite=True)
        args = copy.deepcopy(self.args)  # main.main fills in args; a requeue starts from ours
        args.dist_url = "env://"
        with utils.peer_failures_reported(args):
            return main.main(args)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeue this job, resuming from the newest checkpoint written so far."""
        args = copy.deepcopy(self.args)
        epochs = utils.checkpoint_epochs(args.output_dir) if args.output_dir else []
        # The newest checkpoint of this run that reads: a junk or foreign checkpoint-N.pth in
        # the folder must not make every requeued attempt fail.
        readable = [e for e in epochs if utils.is_run_checkpoint(
            utils.checkpoint_path(args.output_dir, e), e, args.model)]
        if readable:
            args.resume = utils.checkpoint_path(args.output_dir, readable[0])
        source = args.resume or "the start (no checkpoint yet)"
        print(f"Requeuing the job; it resumes from {source}", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(args))


def default_job_dir() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. in some containers
        user = os.environ.get("USER", "user")
    return os.path.join("checkpoint", user, "experiments")


def resolve_cluster(requested: Optional[str]) -> str:
    if requested in (None, "slurm") and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError("SLURM was not found (no sbatch/srun on PATH); "
                        "--cluster local runs the job on this machine")
    return requested or "slurm"


def check_args(args: argparse.Namespace) -> str:
    """Reject what would fail after submission; returns the cluster to submit to."""
    for name in ("nodes", "ngpus", "timeout", "cpus_per_task"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.mem is not None and args.mem < 1:
        raise UserError(f"--mem must be >= 1 (GB), got {args.mem}")
    cluster = resolve_cluster(args.cluster)
    if cluster == "local" and args.nodes > 1:
        raise UserError(f"--nodes {args.nodes} needs SLURM: --cluster local runs on this machine "
                        "only (--nodes 1)")
    if cluster == "debug" and (args.nodes > 1 or args.ngpus > 1):
        raise UserError("--cluster debug runs one process in this interpreter: "
                        "use --nodes 1 --ngpus 1 (or --cluster local for several processes)")
    if cluster != "slurm" and str(args.device).startswith("cuda"):
        # Here the job runs on this machine, so its GPUs can be checked before starting it.
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} but CUDA is not available on this machine; "
                            "pass --device cpu")
        if args.ngpus > torch.cuda.device_count():
            raise UserError(f"--ngpus {args.ngpus} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s)")
    main.validate_args(args)
    return cluster


def resolve_dirs(args: argparse.Namespace) -> str:
    """Absolute job folder (with %j) and output/log dirs defaulting into it; returns the folder."""
    job_dir = os.path.abspath(args.job_dir or default_job_dir())
    folder = job_dir if "%j" in job_dir else os.path.join(job_dir, "%j")
    args.job_dir = job_dir
    args.output_dir = os.path.abspath(args.output_dir) if args.output_dir else folder
    args.log_dir = os.path.abspath(args.log_dir) if args.log_dir else os.path.join(folder, "tb")
    return folder


def submit(args: argparse.Namespace) -> submitit.Job:
    """Check the flags, submit the job and print where its logs and checkpoints go."""
    cluster = check_args(args)
    folder = resolve_dirs(args)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=MAX_NUM_TIMEOUT,
                                     local_max_num_timeout=MAX_NUM_TIMEOUT)
    slurm_extra = {key: value for key, value in (("account", args.account), ("qos", args.qos))
                   if value}
    executor.update_parameters(  # None means: not set
        name=args.job_name or args.model,
        mem_gb=args.mem if args.mem is not None else 40 * args.ngpus,
        gpus_per_node=args.ngpus,
        tasks_per_node=args.ngpus,
        cpus_per_task=args.cpus_per_task,
        nodes=args.nodes,
        timeout_min=args.timeout,
        slurm_partition=args.partition,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
        slurm_constraint="volta32gb" if args.use_volta32 else None,
        slurm_comment=args.comment or None,
        slurm_additional_parameters=slurm_extra or None,
    )
    # The job starts a fresh interpreter that unpickles the Trainer and imports main.py from here.
    python_path = os.environ.get("PYTHONPATH", "")
    if REPO_ROOT not in python_path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, python_path) if p)

    job = executor.submit(Trainer(args))
    processes = args.nodes * args.ngpus
    print(f"Submitted job {job.job_id} ({cluster}: {args.nodes} node(s) x {args.ngpus} "
          f"process(es) = {processes})")
    print(f"stdout: {job.paths.stdout}")
    print(f"stderr: {job.paths.stderr}")
    if processes > 1:
        print(f"(rank 0's logs; every rank writes {job.job_id}_<rank>_log.out/err there)")
    print(f"checkpoints and log.txt: {args.output_dir.replace('%j', str(job.job_id))}")
    return job


def cli(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        job = submit(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if args.cluster == "debug":
        job.result()  # the debug executor runs the job here, now
    return 0


if __name__ == "__main__":
    sys.exit(cli())
