"""Multi-process training on CPU (gloo) through torchrun and the legacy launcher."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import main as lk_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No BatchNorm, drop path, mixup or EMA: a 2 x b run must take the same steps as a 1 x 2b run.
TRAIN = ["main.py", "--model", "convnext_atto", "--device", "cpu", "--input_size", "32",
         "--num_workers", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
         "--drop_path", "0", "--train_subset", "128", "--eval_subset", "61",
         "--warmup_epochs", "1", "--lr", "1e-3", "--epochs", "2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, nproc, argv, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", launcher, f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def read_log(out):
    with open(out / "log.txt") as f:
        return [json.loads(line) for line in f]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    text = launch("torch.distributed.run", 2,
                  TRAIN + ["--batch_size", "16", "--output_dir", str(two)], tmp_path)
    assert "batch size = 32 (16 per process x 1 accumulation x 2 processes)" in text
    assert "rank 1 of 2, gloo" in text
    launch("torch.distributed.run", 1, TRAIN + ["--batch_size", "32", "--output_dir", str(one)],
           tmp_path)

    assert sorted(os.listdir(two)) == ["checkpoint-0.pth", "checkpoint-1.pth",
                                       "checkpoint-best.pth", "log.txt"]
    log_two, log_one = read_log(two), read_log(one)
    assert [r["epoch"] for r in log_two] == [0, 1]  # written once, by rank 0
    # Eval is split across ranks without padding: all 61 images counted once.
    assert log_two[-1]["test_acc1"] == pytest.approx(log_one[-1]["test_acc1"], abs=1e-6)
    a = torch.load(two / "checkpoint-1.pth", map_location="cpu", weights_only=False)["model"]
    b = torch.load(one / "checkpoint-1.pth", map_location="cpu", weights_only=False)["model"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # Only the order of floating-point sums differs (gradient all-reduce vs one batch).
    assert worst < 1e-5, worst


def test_legacy_launcher_passes_local_rank(tmp_path):
    out = tmp_path / "legacy"
    text = launch("torch.distributed.launch", 2,
                  TRAIN + ["--batch_size", "16", "--epochs", "1", "--output_dir", str(out)],
                  tmp_path)
    assert "rank 1 of 2, gloo" in text
    assert [r["epoch"] for r in read_log(out)] == [0]


def test_world_size_without_a_launcher_is_refused(capsys):
    code = lk_main.cli(TRAIN[1:] + ["--world_size", "2"])
    assert code == 2
    assert "--world_size 2 but no launcher started this process" in capsys.readouterr().err


def test_world_size_mismatch_with_the_launcher(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           f"--master_port={free_port()}", *TRAIN, "--world_size", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--world_size 4 does not match the 1 processes the launcher started" in proc.stderr


def _sparse_rank(rank, world_size, init_file, out_dir):
    """One rank of a sparse run whose random draws differ per rank (seeded by rank)."""
    import argparse

    import torch.distributed as dist

    import models
    from sparse import Masking

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    torch.manual_seed(rank)
    model = models.create_model("convnext_atto", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(sparsity=0.5, sparse_init="uniform", prune_rate=0.3,
                              growth="random", update_frequency=1, fix=False, verbose=False,
                              epochs=1, only_L=False)
    masking = Masking(model, optimizer, args, steps_per_epoch=3)
    masking.init()
    for _ in range(3):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        masking.step()
        optimizer.zero_grad()
    torch.save(masking.state_dict(), os.path.join(out_dir, f"masks-{rank}.pt"))
    dist.destroy_process_group()


def test_sparse_masks_are_identical_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_sparse_rank, args=(2, str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    first, second = (torch.load(tmp_path / f"masks-{r}.pt") for r in (0, 1))
    assert first.keys() == second.keys() and len(first) > 10
    for name in first:
        assert torch.equal(first[name], second[name]), name
