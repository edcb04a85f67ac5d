"""Multi-process training on CPU (gloo) through torchrun and the legacy launcher, and the
training loop's multi-GPU habits: one gradient all-reduce per update, no host read per
micro-batch, and a bounded wait for a stopped process."""
import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import engine
import main as lk_main
import utils

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


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference: one process with the whole global batch of 32."""
    one = tmp_path_factory.mktemp("one")
    launch("torch.distributed.run", 1, TRAIN + ["--batch_size", "32", "--output_dir", str(one)],
           one)
    return one


def max_weight_difference(run_a, run_b):
    a = torch.load(run_a / "checkpoint-1.pth", map_location="cpu", weights_only=False)["model"]
    b = torch.load(run_b / "checkpoint-1.pth", map_location="cpu", weights_only=False)["model"]
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, one_process_run):
    two, one = tmp_path / "two", one_process_run
    text = launch("torch.distributed.run", 2,
                  TRAIN + ["--batch_size", "16", "--output_dir", str(two)], tmp_path)
    assert "batch size = 32 (16 per process x 1 accumulation x 2 processes)" in text
    assert "rank 1 of 2, gloo" in text

    assert sorted(os.listdir(two)) == ["checkpoint-0.pth", "checkpoint-1.pth",
                                       "checkpoint-best.pth", "log.txt"]
    log_two, log_one = read_log(two), read_log(one)
    assert [r["epoch"] for r in log_two] == [0, 1]  # written once, by rank 0
    # Eval is split across ranks without padding: all 61 images counted once.
    assert log_two[-1]["test_acc1"] == pytest.approx(log_one[-1]["test_acc1"], abs=1e-6)
    worst = max_weight_difference(two, one)
    # Only the order of floating-point sums differs (gradient all-reduce vs one batch).
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_accumulation_under_ddp_equals_one_process_with_the_same_global_batch(
        tmp_path, one_process_run):
    """2 processes x 2 micro-batches of 8, reduced once per update (no_sync on the first)."""
    out = tmp_path / "accumulated"
    text = launch("torch.distributed.run", 2,
                  TRAIN + ["--batch_size", "8", "--update_freq", "2", "--output_dir", str(out)],
                  tmp_path)
    assert "batch size = 32 (8 per process x 2 accumulation x 2 processes); 4 updates" in text
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    worst = max_weight_difference(out, one_process_run)
    assert worst < 1e-5, worst


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sparse_masks_are_identical_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_sparse_rank, args=(2, str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    first, second = (torch.load(tmp_path / f"masks-{r}.pt") for r in (0, 1))
    assert first.keys() == second.keys() and len(first) > 10
    for name in first:
        assert torch.equal(first[name], second[name]), name


UPDATES, ACCUMULATION = 3, 4


def tiny_data(world_size):
    """UPDATES x ACCUMULATION micro-batches of 2 samples per process."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * world_size, 12, generator=g),
             torch.randint(0, 5, (2 * world_size,), generator=g))
            for _ in range(UPDATES * ACCUMULATION)]


def train_tiny(model, data, optimizer):
    engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), data, optimizer,
                           torch.device("cpu"), 0, utils.LossScaler(False, "cpu"),
                           num_training_steps_per_epoch=UPDATES, update_freq=ACCUMULATION)


def _counted_allreduce_rank(rank, world_size, init_file, out_dir):
    """One rank of DDP training with accumulation, eager and under torch.compile, counting the
    gradient all-reduce rounds through a communication hook."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    shard = [(x[rank::world_size], y[rank::world_size]) for x, y in tiny_data(world_size)]
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(12, 5)
        ddp = DistributedDataParallel(model)
        buckets = []

        def counting_allreduce(state, bucket):
            buckets.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        # The eager backend keeps the OptimizedModule wrapper (as main.py's --compile does)
        # without inductor's compile time.
        net = torch.compile(ddp, backend="eager") if compiled else ddp
        train_tiny(net, shard, torch.optim.SGD(model.parameters(), lr=0.5))
        # Every round reduces bucket 0 once, however many buckets the model needs.
        results[compiled] = {"rounds": buckets.count(0), "weights": model.state_dict()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_all_reduces_once_per_update_not_per_micro_batch(tmp_path):
    torch.multiprocessing.spawn(_counted_allreduce_rank,
                                args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    reference = torch.nn.Linear(12, 5)  # one process, the two shards as one batch
    train_tiny(reference, tiny_data(2), torch.optim.SGD(reference.parameters(), lr=0.5))
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for compiled, result in results.items():
            # Without no_sync this is UPDATES * ACCUMULATION (12).
            assert result["rounds"] == UPDATES, (rank, compiled, result["rounds"])
            for key, value in reference.state_dict().items():
                assert torch.allclose(result["weights"][key], value, atol=1e-6), (rank, key)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


class RecordingWriter:
    """Stands in for the SummaryWriter: keeps every scalar as (tag, step) -> value."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        assert (tag, step) not in self.scalars, (tag, step)
        self.scalars[tag, step] = value


class RecordingTensorboard(utils.TensorboardLogger):
    def __init__(self, step):
        self.writer = RecordingWriter()
        self.step = step


class RecordingLoss(torch.nn.Module):
    """Cross-entropy that keeps each loss and accuracy as tensors (no host read), and returns
    nan from iteration ``nan_from`` on."""

    def __init__(self, nan_from=None):
        super().__init__()
        self.losses, self.accuracies, self.nan_from = [], [], nan_from

    def forward(self, output, target):
        loss = torch.nn.functional.cross_entropy(output, target)
        if self.nan_from is not None and len(self.losses) >= self.nan_from:
            loss = loss * float("nan")
        self.losses.append(loss.detach().clone())
        self.accuracies.append((output.argmax(dim=-1) == target).float().mean())
        return loss


class RecordingScaler(utils.LossScaler):
    def __init__(self):
        super().__init__(False, "cpu")
        self.norms = []

    def __call__(self, *args, **kwargs):
        norm = super().__call__(*args, **kwargs)
        if norm is not None:
            self.norms.append(norm.detach().clone())
        return norm


def running_average(values):
    """The global average as SmoothedValue accumulates it, float by float."""
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


def test_training_loop_reads_metrics_on_the_host_only_at_progress_lines(monkeypatch, capsys):
    iterations, print_freq, accumulation = 40, 10, 2
    updates = iterations // accumulation
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 5)
    data = [(torch.randn(4, 12), torch.randint(0, 5, (4,))) for _ in range(iterations)]
    lr_schedule = np.linspace(0.2, 0.02, 100)
    criterion, scaler, writer = RecordingLoss(), RecordingScaler(), RecordingTensorboard(50)
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    stats = engine.train_one_epoch(
        model, criterion, data, torch.optim.SGD(model.parameters(), lr=0.1),
        torch.device("cpu"), 2, scaler, max_norm=1.0, log_writer=writer, start_steps=50,
        lr_schedule_values=lr_schedule, num_training_steps_per_epoch=updates,
        update_freq=accumulation, print_freq=print_freq)
    monkeypatch.undo()
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("Epoch: [2]  [")]
    assert len(lines) == 5  # iterations 0, 10, 20, 30 and the last, 39
    # Old habit: loss, accuracy and grad norm read per micro-batch (100 reads here).
    assert 1 <= len(reads) <= len(lines), reads

    losses = [loss.item() for loss in criterion.losses]
    accuracies = [acc.item() for acc in criterion.accuracies]
    norms = [norm.item() for norm in scaler.norms]
    lrs = [float(lr_schedule[50 + i // accumulation]) for i in range(iterations)]
    assert len(losses) == iterations and len(norms) == updates
    assert stats["loss"] == running_average(losses)
    assert stats["class_acc"] == running_average(accuracies)
    assert stats["grad_norm"] == running_average(norms)
    assert stats["lr"] == running_average(lrs)
    # Each progress line shows the meters up to its own iteration, not an older flush.
    for line, i in zip(lines, (0, 10, 20, 30, 39)):
        window = losses[max(0, i - 19):i + 1]  # the loss meter's window of 20
        expected = f"loss: {np.median(window):.4f} ({running_average(losses[:i + 1]):.4f})"
        assert expected in line, (i, line)
    # TensorBoard: one point per update at steps 50.., with the update's last micro-batch.
    assert writer.step == 50 + updates
    for u in range(updates):
        last = u * accumulation + accumulation - 1
        assert writer.writer.scalars["loss/loss", 50 + u] == losses[last]
        assert writer.writer.scalars["loss/class_acc", 50 + u] == accuracies[last]
        assert writer.writer.scalars["opt/grad_norm", 50 + u] == norms[u]
        assert writer.writer.scalars["opt/lr", 50 + u] == lrs[last]
    assert len(writer.writer.scalars) == 6 * updates  # loss, class_acc, lr, min_lr, wd, norm


def test_a_non_finite_loss_is_reported_at_its_first_iteration_at_the_next_progress_line():
    consumed = []

    def loader():
        for i in range(40):
            consumed.append(i)
            yield torch.randn(4, 12), torch.randint(0, 5, (4,))

    model = torch.nn.Linear(12, 5)
    writer = RecordingTensorboard(0)
    with pytest.raises(utils.UserError,
                       match=r"^loss is nan at epoch 1, iteration 13 \(update 106\); stopping"):
        engine.train_one_epoch(model, RecordingLoss(nan_from=13), loader(),
                               torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                               1, utils.LossScaler(False, "cpu"), log_writer=writer,
                               start_steps=100, num_training_steps_per_epoch=20, update_freq=2,
                               print_freq=10)
    # Found when iteration 20's progress line was due, not at iteration 13 itself.
    assert consumed[-1] == 20
    # Logged are the updates before it (iterations 0-11), as when it stopped at once.
    assert sorted({step for _, step in writer.writer.scalars}) == list(range(6))


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_dist_timeout_must_be_positive(capsys, value):
    assert lk_main.cli(TRAIN[1:] + ["--dist_timeout", value]) == 2
    err = capsys.readouterr().err
    assert f"error: --dist_timeout must be a positive number of minutes, got {float(value)}" in err


# Rank 1 stops answering as training starts (after the collectives of the set-up).
HANGING_RANK = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import main
    if os.environ["RANK"] == "1":
        main.train_one_epoch = lambda *args, **kwargs: time.sleep(600)
    sys.exit(main.cli(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_hanging_process_ends_the_job_after_dist_timeout(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANGING_RANK.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(script), *TRAIN[1:], "--train_subset", "32",
           "--batch_size", "8", "--epochs", "1", "--disable_eval", "true",
           "--dist_timeout", "0.1"]
    start = time.monotonic()
    # Rank 1 sleeps 600 s: finishing well within the timeout means rank 0 gave up on it.
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: rank 0: a collective did not complete within "
                                "--dist_timeout 0.1 min (another process stopped or hangs): ")
    assert "Timed out" in errors[0]
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary: rank 0 exited through UserError
    assert elapsed < 240, elapsed


def _stopping_peer_rank(rank, init_file, out_dir):
    """Rank 1 exits before the all-reduce; rank 0 records how its wait ended."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    args = argparse.Namespace(dist_on_itp=False, local_rank=-1, world_size=1, device="cpu",
                              dist_url=f"file://{init_file}", dist_timeout=1.0)
    utils.init_distributed_mode(args)
    if rank == 1:
        return
    start = time.monotonic()
    try:
        with utils.peer_failures_reported(args):
            torch.distributed.all_reduce(torch.ones(3))
        outcome = "completed"
    except utils.UserError as err:
        outcome = str(err)
    seconds = time.monotonic() - start
    try:  # a programming error inside a process group is not mistaken for a stopped peer
        with utils.peer_failures_reported(args):
            torch.nn.Linear(3, 2)(torch.ones(1, 4))
    except Exception as err:  # noqa: BLE001 - recorded for the test to check
        bug = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, "outcome.json"), "w") as f:
        json.dump({"outcome": outcome, "seconds": seconds, "bug": bug}, f)


@pytest.mark.slow
def test_a_stopped_peer_is_reported_at_once(tmp_path):
    torch.multiprocessing.spawn(_stopping_peer_rank, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    with open(tmp_path / "outcome.json") as f:
        result = json.load(f)
    assert result["outcome"].startswith(
        "rank 0: a collective did not complete within --dist_timeout 1 min (another process "
        "stopped or hangs): "), result
    assert "/gloo/" not in result["outcome"]  # gloo's source location is left out
    assert result["seconds"] < 30  # the closed connection, not the one-minute timeout
    assert result["bug"].startswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied")
