"""run_with_submitit.py: jobs through submitit's local executor (the code path of a SLURM job:
pickled Trainer, one process per task, env:// set-up, signal-driven requeue), the sbatch script
it writes for SLURM (with a stand-in sbatch), and its messages for bad input."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import pytest
import submitit
import torch

import run_with_submitit as rws

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--device cpu --model convnext_atto --input_size 32 --batch_size 16 --num_workers 0 "
        "--aa none --reprob 0 --mixup 0 --cutmix 0 --eval_subset 32 --warmup_epochs 0 "
        "--ngpus 1 --nodes 1").split()


def parse(*flags: str):
    return rws.get_args_parser().parse_args(TINY + list(flags))


def logged_epochs(output_dir: Path) -> List[int]:
    path = output_dir / "log.txt"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def child_pids(pid: int) -> List[int]:
    """Processes whose parent is pid (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children


# 10 updates an epoch: a signal sent when epoch 0 is logged arrives while epoch 1 trains.
EPOCHS = ["--epochs", "2", "--train_subset", "160"]


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """An uninterrupted local job (also the reference for the requeued one)."""
    job_dir = tmp_path_factory.mktemp("finished")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        job = rws.submit(parse("--cluster", "local", *EPOCHS, "--job_dir", str(job_dir)))
    stats = job.result()
    return job, job_dir / job.job_id, printed.getvalue(), stats


def test_local_job_runs_to_completion(finished_job):
    job, out, printed, stats = finished_job
    assert f"Submitted job {job.job_id} (local" in printed
    assert f"stdout: {out / f'{job.job_id}_0_log.out'}" in printed
    assert f"stderr: {out / f'{job.job_id}_0_log.err'}" in printed
    assert stats["epoch"] == 1
    assert logged_epochs(out) == [0, 1]
    assert (out / "checkpoint-0.pth").exists() and (out / "checkpoint-1.pth").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert "distributed init (rank 0 of 1, gloo): env://" in job.stdout()


@pytest.mark.slow
def test_time_limit_requeues_and_resumes_where_it_stopped(tmp_path, finished_job):
    # --timeout 1: the signal below comes later than submitit's "guaranteed" run time, so the job
    # counts as timed out (not pre-empted), as when SLURM warns of the time limit.
    job = rws.submit(parse("--cluster", "local", *EPOCHS, "--timeout", "1",
                           "--job_dir", str(tmp_path)))
    out = tmp_path / job.job_id
    wait_for(lambda: logged_epochs(out) == [0], "epoch 0 of the job")
    (task,) = child_pids(job._process.pid)
    os.kill(task, signal.SIGUSR2)  # what SLURM sends SIGNAL_DELAY_S before the time limit
    assert job.result()["epoch"] == 1

    log = job.stdout()
    assert "this job is timed-out" in log and "Requeued job" in log
    starts = re.findall(r"Start training for 2 epochs \(from epoch (\d+)\)", log)
    assert starts == ["0", "1"]
    assert f"Resume checkpoint {out / 'checkpoint-0.pth'}" in log
    assert logged_epochs(out) == [0, 1]
    final = torch.load(out / "checkpoint-1.pth", map_location="cpu", weights_only=False)["model"]
    expected = torch.load(finished_job[1] / "checkpoint-1.pth", map_location="cpu",
                          weights_only=False)["model"]
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key


@pytest.mark.slow
def test_two_process_job_requeues_every_rank(tmp_path):
    job = rws.submit(parse("--cluster", "local", "--ngpus", "2", "--epochs", "2",
                           "--train_subset", "320", "--job_dir", str(tmp_path)))
    out = tmp_path / job.job_id
    wait_for(lambda: logged_epochs(out) == [0], "epoch 0 of the job")
    tasks = child_pids(job._process.pid)
    assert len(tasks) == 2
    for task in tasks:  # SLURM signals every task; only rank 0 checkpoints and requeues
        os.kill(task, signal.SIGUSR2)
    assert [stats["epoch"] for stats in job.results()] == [1, 1]

    rank0, rank1 = ((out / f"{job.job_id}_{rank}_log.out").read_text() for rank in (0, 1))
    assert "this job is preempted" in rank0 and "Requeued job" in rank0
    assert rank0.count("Starting with JobEnvironment") == rank1.count("Starting with") == 2
    assert re.findall(r"Start training for 2 epochs \(from epoch (\d+)\)", rank0) == ["0", "1"]
    assert logged_epochs(out) == [0, 1]


def test_checkpoint_resubmits_from_newest_checkpoint(tmp_path):
    args = parse("--output_dir", str(tmp_path))
    for epoch in (3, 12, 7):
        torch.save({"model": {}, "epoch": epoch, "args": args}, tmp_path / f"checkpoint-{epoch}.pth")
    torch.save({"model": {}, "epoch": 14}, tmp_path / "checkpoint-best.pth")
    # Newer names that are not readable checkpoints of this run are passed over.
    (tmp_path / "checkpoint-13.pth").write_bytes(b"junk")
    (tmp_path / "checkpoint-13.pth.tmp.99").write_bytes(b"")
    trainer = rws.Trainer(args)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, rws.Trainer) and delayed.function is not trainer
    assert delayed.function.args.resume == str(tmp_path / "checkpoint-12.pth")
    assert args.resume == ""  # the running job's own arguments are left alone

    # Before the first checkpoint: start as submitted (a given --resume is kept).
    args = parse("--output_dir", str(tmp_path / "empty"), "--resume", "/weights/pretrained.pth")
    assert rws.Trainer(args).checkpoint().function.args.resume == "/weights/pretrained.pth"


def test_output_and_log_dirs_default_into_the_job_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse()
    folder = rws.resolve_dirs(args)
    user_dir = tmp_path / rws.default_job_dir()
    assert Path(rws.default_job_dir()).parts[0] == "checkpoint"
    assert (folder, args.output_dir, args.log_dir) == (
        str(user_dir / "%j"), str(user_dir / "%j"), str(user_dir / "%j" / "tb"))

    args = parse("--job_dir", "runs/%j_a", "--output_dir", "out", "--log_dir", "tb")
    assert rws.resolve_dirs(args) == str(tmp_path / "runs" / "%j_a")  # no second %j
    assert (args.output_dir, args.log_dir) == (str(tmp_path / "out"), str(tmp_path / "tb"))


def fake_sbatch(tmp_path: Path, monkeypatch) -> None:
    """An sbatch that accepts anything (and the srun submitit looks for): submitit writes the
    script, the test reads it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", "echo 'Submitted batch job 4242'"), ("srun", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_slurm_script_requests_what_the_flags_say(tmp_path, monkeypatch, capsys):
    fake_sbatch(tmp_path, monkeypatch)
    jobs = tmp_path / "jobs"
    assert rws.cli(TINY[:-4] + ["--nodes", "4", "--ngpus", "8", "--timeout", "90",
                                "--partition", "learnlab", "--account", "vision", "--qos", "high",
                                "--use_volta32", "--comment", "deadline", "--mem", "300",
                                "--job_dir", str(jobs)]) == 0
    printed = capsys.readouterr().out
    assert "Submitted job 4242 (slurm: 4 node(s) x 8 process(es) = 32)" in printed
    assert f"stdout: {jobs / '4242' / '4242_0_log.out'}" in printed
    script = (jobs / "4242" / "4242_submission.sh").read_text()
    for line in ("--job-name=convnext_atto", "--nodes=4", "--ntasks-per-node=8",
                 "--gpus-per-node=8", "--cpus-per-task=10", "--mem=300GB", "--time=90",
                 "--partition=learnlab", "--signal=USR2@120", "--constraint=volta32gb",
                 "--comment=deadline", "--account=vision", "--qos=high"):
        assert f"#SBATCH {line}\n" in script, line
    assert f"srun --unbuffered --output {jobs / '%j' / '%j_%t_log.out'} " in script

    assert rws.cli(TINY + ["--job_dir", str(tmp_path / "plain")]) == 0
    script = (tmp_path / "plain" / "4242" / "4242_submission.sh").read_text()
    assert "--mem=40GB" in script  # 40 GB per GPU by default
    for absent in ("--partition", "--account", "--qos", "--constraint", "--comment"):
        assert absent not in script, absent


@pytest.mark.parametrize("flags, message", [
    ([], "SLURM was not found (no sbatch/srun on PATH); --cluster local runs the job on this "
         "machine"),
    (["--nodes", "2", "--cluster", "slurm"], "SLURM was not found"),
    (["--nodes", "2", "--cluster", "local"],
     "--nodes 2 needs SLURM: --cluster local runs on this machine only (--nodes 1)"),
    (["--nodes", "0", "--cluster", "local"], "--nodes must be >= 1, got 0"),
    (["--ngpus", "0", "--cluster", "local"], "--ngpus must be >= 1, got 0"),
    (["--timeout", "0", "--cluster", "local"], "--timeout must be >= 1, got 0"),
    (["--ngpus", "2", "--cluster", "debug"],
     "--cluster debug runs one process in this interpreter"),
    (["--model", "no_such_model", "--cluster", "local"], "no_such_model"),
])
def test_bad_input_is_refused_before_submission(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert rws.cli(TINY + flags + ["--job_dir", str(tmp_path / "jobs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "jobs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_local_cuda_job_without_cuda_is_refused(tmp_path, capsys):
    assert rws.cli(TINY + ["--cluster", "local", "--device", "cuda",
                           "--job_dir", str(tmp_path)]) == 2
    assert "--device cuda but CUDA is not available on this machine" in capsys.readouterr().err


def test_command_line_without_slurm_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_with_submitit.py"), "--nodes", "4", "--ngpus", "8",
         "--model", "RepLKNet-31B", "--job_dir", str(tmp_path / "jobs")],
        cwd=tmp_path, env={**os.environ, "PATH": str(tmp_path)}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: SLURM was not found (no sbatch/srun on PATH); --cluster local runs the job on "
        "this machine"]
