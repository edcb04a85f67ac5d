"""Distillation (main_KD.py, distill.py): the KD and NKD losses by hand, the teacher left
untouched, and teacher -> student runs on the embedded Fashion-MNIST data (CPU)."""
import argparse
import copy
import glob
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

import engine
import main as lk_main
import main_KD
import models
import utils
from distill import DistillationLoss, kd_loss, nkd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small SLaK teacher (BatchNorm after every branch, re-parameterized for inference) and the
# smallest ConvNeXt as the student.
TEACHER = ["--model", "SLaK_tiny", "--kernel_size", "7", "7", "7", "7", "3",
           "--width_factor", "0.25"]
FAST = ["--model_s", "convnext_atto", "--device", "cpu", "--input_size", "32",
        "--batch_size", "16", "--num_workers", "0", "--aa", "none", "--reprob", "0",
        "--warmup_epochs", "0", "--lr", "2e-3", "--eval_subset", "64"]


def parse(argv):
    return main_KD.get_args_parser().parse_args(argv)


def run(argv):
    return main_KD.main(parse(argv))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- losses by hand

@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_loss_by_hand(T):
    # Student uniform over 2 classes; teacher logits (0, ln 3): softmax (1/4, 3/4) at T = 1,
    # and at T = 2 the logits (0, ln(3)/2) give (1, sqrt 3) / (1 + sqrt 3).
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    root = math.sqrt(3.0) if T == 2.0 else 3.0
    p = [1 / (1 + root), root / (1 + root)]
    expected = T * T * sum(pk * math.log(pk / 0.5) for pk in p)
    assert kd_loss(student, teacher, T).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_nkd_loss_by_hand(T):
    # Label 0. Student logits (0, ln 2, 0): softmax (1/4, 1/2, 1/4). Teacher logits
    # (ln 2, ln 3, 0): softmax (2/6, 3/6, 1/6).
    student = torch.tensor([[0.0, math.log(2.0), 0.0]])
    teacher = torch.tensor([[math.log(2.0), math.log(3.0), 0.0]])
    target, non_target = nkd_loss(student, teacher, torch.tensor([0]), T=T, gamma=1.5)
    # Target term: -p_t(y) * log p_s(y) = -(1/3) * log(1/4).
    assert target.item() == pytest.approx(math.log(4.0) / 3, rel=1e-6)
    # Non-target classes (1, 2): teacher logits (ln 3, 0) / T, student (ln 2, 0) / T.
    q_t = [3 ** (1 / T), 1.0]
    q_s = [2 ** (1 / T), 1.0]
    q_t = [v / sum(q_t) for v in q_t]
    q_s = [v / sum(q_s) for v in q_s]
    expected = -1.5 * T * T * sum(a * math.log(b) for a, b in zip(q_t, q_s))
    assert non_target.item() == pytest.approx(expected, rel=1e-6)


def test_nkd_non_target_term_is_the_renormalised_softmax():
    """The softmax over the other classes equals the full softmax at T, renormalised without
    the target (the paper's definition), for any logits and labels."""
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    T = 3.0
    _, non_target = nkd_loss(s, t, labels, T=T, gamma=1.0)
    others = torch.ones(6, 5, dtype=torch.bool)
    others[torch.arange(6), labels] = False
    p_t, p_s = F.softmax(t / T, dim=1), F.softmax(s / T, dim=1)
    q_t = p_t[others].view(6, 4) / (1 - p_t[torch.arange(6), labels])[:, None]
    q_s = p_s[others].view(6, 4) / (1 - p_s[torch.arange(6), labels])[:, None]
    expected = -T * T * (q_t * q_s.log()).sum(dim=1).mean()
    assert non_target.item() == pytest.approx(expected.item(), rel=1e-5)


class FixedTeacher(torch.nn.Module):
    """Returns given logits whatever the input; its one parameter would get a gradient if
    anything flowed back into it."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.logits * self.scale


def test_nkd_with_mixup_targets_uses_the_dominant_class():
    # Two samples, 3 classes; mixed targets whose largest weights are classes 1 and 0.
    student = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]], requires_grad=True)
    teacher_logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.05, 0.35]])
    loss_fn = DistillationLoss(FixedTeacher(teacher_logits), SoftTargetCrossEntropy(), "NKD",
                               T=2.0, gamma=1.5)
    loss, terms = loss_fn(torch.zeros(2, 3, 4, 4), student, targets)
    ce = -(targets * F.log_softmax(student, dim=1)).sum(dim=1).mean()
    target, non_target = nkd_loss(student, teacher_logits, torch.tensor([1, 0]), T=2.0,
                                  gamma=1.5)
    assert terms["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms["loss_nkd_target"].item() == pytest.approx(target.item(), rel=1e-6)
    assert terms["loss_nkd_nontarget"].item() == pytest.approx(non_target.item(), rel=1e-6)
    assert loss.item() == pytest.approx((ce + target + non_target).item(), rel=1e-6)
    # By hand, sample 1 (label 1): -p_t(1) log p_s(1), p_t = e^2/(1+e^2+e), p_s = e/(2+e).
    e = math.e
    first = -(e ** 2 / (1 + e ** 2 + e)) * math.log(e / (2 + e))
    second = -(e / (e + 2)) * math.log(e ** 2 / (e ** 2 + 1 + e))  # sample 2, label 0
    assert target.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_kd_weights_and_hard_labels():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
    teacher_logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 1])
    teacher = FixedTeacher(teacher_logits)
    ce = F.cross_entropy(student, labels)
    loss, terms = DistillationLoss(teacher, torch.nn.CrossEntropyLoss(), "KD", T=3.0,
                                   alpha=0.25)(None, student, labels)
    assert terms["loss_ce"].item() == pytest.approx(0.75 * ce.item(), rel=1e-6)
    assert terms["loss_kd"].item() == pytest.approx(
        0.25 * kd_loss(student, teacher_logits, 3.0).item(), rel=1e-6)
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    # --hard: the teacher's argmax labels are (1, 2).
    loss, terms = DistillationLoss(teacher, torch.nn.CrossEntropyLoss(), "KD",
                                   hard=True)(None, student, labels)
    hard = F.cross_entropy(student, torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(0.5 * ce.item() + 0.5 * hard.item(), rel=1e-6)


# --------------------------------------------------------------------------- the teacher

@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A SLaK teacher checkpoint (random weights, BN statistics of one forward in training)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.manual_seed(0)
    model = models.create_model("SLaK_tiny", num_classes=10, kernel_size=[7, 7, 7, 7, 3],
                                width_factor=0.25)
    model(torch.randn(8, 3, 32, 32))  # non-trivial BN running statistics
    torch.save({"model": model.state_dict(), "epoch": 9}, path)
    return path


def test_no_gradient_reaches_the_teacher(teacher_file):
    """A training step of the student through the engine leaves every teacher tensor as it was
    (weights and BN statistics) and gives none of them a gradient, even a teacher whose
    parameters require one."""
    args = parse(TEACHER + FAST + ["--resume", str(teacher_file)])
    teacher = main_KD.load_teacher(args, 10, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    eager = FixedTeacher(torch.randn(4, 10))
    before = copy.deepcopy(teacher.state_dict())
    student = models.create_model("convnext_atto", num_classes=10)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))]
    for model in (teacher, eager):
        criterion = DistillationLoss(model, torch.nn.CrossEntropyLoss(), "NKD", T=2.0)
        engine.train_one_epoch(student, criterion, data, optimizer, torch.device("cpu"), 0,
                               utils.LossScaler(False, "cpu"), num_training_steps_per_epoch=1)
    assert eager.scale.grad is None
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_teacher_is_re_parameterized_when_that_makes_it_smaller(teacher_file):
    """SLaK without Decom: one 7x7 conv with bias per block instead of 7x7 + 3x3 with two BNs;
    the same function in eval mode."""
    args = parse(TEACHER + FAST + ["--resume", str(teacher_file)])
    teacher = main_KD.load_teacher(args, 10, torch.device("cpu"))
    trained = models.create_model("SLaK_tiny", num_classes=10, kernel_size=[7, 7, 7, 7, 3],
                                  width_factor=0.25)
    trained.load_state_dict(load(teacher_file)["model"])
    assert "stages.0.0.large_kernel.lkb_reparam.weight" in teacher.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), trained.eval()(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher_file):
    """KD with mixup soft targets, label smoothing, EMA and gradient accumulation, 2 epochs."""
    out = tmp_path_factory.mktemp("kd")
    digest = sha256(teacher_file)
    argv = TEACHER + FAST + ["--resume", str(teacher_file), "--distill_type", "KD", "--T", "2",
                             "--alpha", "0.5", "--mixup", "0.5", "--cutmix", "0",
                             "--train_subset", "64", "--update_freq", "2", "--epochs", "2",
                             "--model_ema", "true", "--model_ema_decay", "0.9",
                             "--model_ema_eval", "true", "--output_dir", str(out),
                             "--log_dir", str(out / "tb")]
    stats = run(argv)
    return out, argv, stats, digest


def test_distillation_run_logs_terms_and_checkpoints_the_student(distilled, teacher_file):
    out, _, stats, digest = distilled
    assert sha256(teacher_file) == digest  # the teacher's file is never written
    log = read_log(out)
    assert [row["epoch"] for row in log] == [0, 1]
    for row in log:
        assert row["train_loss"] == pytest.approx(row["train_loss_ce"] + row["train_loss_kd"],
                                                  rel=1e-6)
        assert row["train_loss_kd"] > 0 and row["train_loss_ce"] > 0
        # The student's parameters, not the teacher's.
        assert row["n_parameters"] == sum(
            p.numel() for p in models.create_model("convnext_atto", num_classes=10).parameters())
    assert stats["test_acc1"] == log[-1]["test_acc1"] and "test_acc1_ema" in log[-1]
    events = glob.glob(str(out / "tb" / "events.out.tfevents*"))
    assert events and b"loss/loss_kd" in open(events[0], "rb").read()
    ckpt = load(out / "checkpoint-1.pth")
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args", "model_ema"}
    student_keys = models.create_model("convnext_atto", num_classes=10).state_dict().keys()
    assert ckpt["model"].keys() == student_keys == ckpt["model_ema"].keys()
    assert ckpt["args"].model == "convnext_atto" and ckpt["args"].distill_type == "KD"
    assert ckpt["args"].teacher == {"model": "SLaK_tiny", "resume": str(teacher_file),
                                    "kernel_size": [7, 7, 7, 7, 3], "width_factor": 0.25}


def test_resumed_distillation_equals_the_uninterrupted_run(distilled, tmp_path, monkeypatch,
                                                           capsys):
    out, argv, _, _ = distilled
    resumed = tmp_path / "resumed"
    argv = [str(resumed) if a == str(out) else str(resumed / "tb") if a == str(out / "tb")
            else a for a in argv]
    real_train = lk_main.train_one_epoch

    def killed_in_epoch_1(*args, **kwargs):
        if args[5] == 1:
            raise KeyboardInterrupt("simulated kill")
        return real_train(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(lk_main, "train_one_epoch", killed_in_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            run(argv)
    capsys.readouterr()
    # The README's spelling: --distill_resume, here even with --auto_resume off.
    run(argv + ["--distill_resume", "--auto_resume", "false"])
    assert f"Resume checkpoint {resumed / 'checkpoint-0.pth'}" in capsys.readouterr().out
    full, again = load(out / "checkpoint-1.pth"), load(resumed / "checkpoint-1.pth")
    for part in ("model", "model_ema"):
        for key, value in full[part].items():
            assert torch.equal(again[part][key], value), f"{part}.{key}"
    def logged(folder):  # everything but the wall-clock throughput
        return [{k: v for k, v in row.items() if k != "train_images_per_sec"}
                for row in read_log(folder)]

    assert logged(resumed) == logged(out)


def test_distill_resume_never_loads_the_teacher_into_the_student(tmp_path, capsys):
    """Teacher and student of the same architecture: upstream's --distill_resume on a fresh
    folder loaded the teacher's file into the student; here the student starts from its own
    initialization (with lr 0 it ends there)."""
    teacher = models.create_model("convnext_atto", num_classes=10)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    out = tmp_path / "out"
    run(["--model", "convnext_atto", "--resume", str(path), "--distill_type", "NKD",
         "--distill_resume", "--lr", "0", "--epochs", "1", "--train_subset", "32",
         "--mixup", "0", "--cutmix", "0", "--disable_eval", "true", "--output_dir", str(out)]
        + FAST)
    assert "Resume checkpoint" not in capsys.readouterr().out
    student = load(out / "checkpoint-0.pth")["model"]
    for key, value in teacher.state_dict().items():
        if value.numel() > 1:
            assert not torch.equal(student[key], value), key


def test_sparse_student_with_bf16_autocast(tmp_path, teacher_file):
    """--sparse masks the student (not the teacher) and keeps them through NKD updates under
    bf16 autocast with the teacher in it too."""
    stats = run(TEACHER + FAST + [
        "--resume", str(teacher_file), "--distill_type", "NKD", "--mixup", "0", "--cutmix", "0",
        "--train_subset", "64", "--update_freq", "2", "--epochs", "1", "--use_amp", "true",
        "--amp_dtype", "bfloat16", "--sparse", "--sparsity", "0.5", "-u", "1",
        "--disable_eval", "true", "--output_dir", str(tmp_path)])
    assert stats["sparse_density"] == pytest.approx(0.5, abs=0.005)
    assert stats["train_loss"] == pytest.approx(
        stats["train_loss_ce"] + stats["train_loss_nkd_target"]
        + stats["train_loss_nkd_nontarget"], rel=1e-6)
    ckpt = load(tmp_path / "checkpoint-0.pth")
    assert set(ckpt["masks"]) <= set(ckpt["model"])  # the student's parameter names
    assert "stages.0.0.dwconv.weight" in ckpt["masks"]
    for name, mask in ckpt["masks"].items():
        assert torch.count_nonzero(ckpt["model"][name][~mask]) == 0, name


# --------------------------------------------------------------------------- upstream's command

# SLaK README, "Distilling SLaK-S to ConvNeXt-S with NKD" (without the launcher).
README_KD = ("--resume SLaK_small.pth --Decom True --T 3.0 --width_factor 1.3 -u 2000 "
             "--distill_resume --lr_fd 3e-5 --epochs 300 --model SLaK_small --distill_type NKD "
             "--model_s SLaK_small --drop_path 0.1 --batch_size 64 --lr 4e-3 --update_freq 16 "
             "--model_ema true --model_ema_eval false --data_path /path/to/imagenet "
             "--kernel_size 51 49 47 13 5 --output_dir out")


def test_upstream_readme_command_builds_slaks_teacher_and_l2s_student():
    args = parse(shlex.split(README_KD))
    main_KD.check_distill_args(args)
    student = main_KD.student_args(args)
    with torch.device("meta"):
        teacher = lk_main.build_model(args, 1000)
        l2s = lk_main.build_model(student, 1000)
    millions = [round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for m in (teacher, l2s)]
    # SLaK-S (width 1.3, Decom) and upstream's "ConvNeXt L2S-S 50M".
    assert millions == [91.13, 50.24]
    keys = l2s.state_dict().keys()
    assert "stages.2.26.large_kernel.lkb_origin.conv.weight" in keys
    assert "stages.2.26.large_kernel.lkb_origin.bn.running_var" in keys
    assert not any("small_conv" in k or "LoRA" in k or "dwconv" in k for k in keys)
    assert l2s.state_dict()["stages.0.0.large_kernel.lkb_origin.conv.weight"].shape == (
        96, 1, 7, 7)
    assert student.resume == "" and student.auto_resume and args.T == 3.0


# --------------------------------------------------------------------------- bad input

def cli_error(argv, capsys):
    code = main_KD.cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    return lines[0]


@pytest.mark.parametrize("flags, expected", [
    (["--distill_type", "FD"], "error: --distill_type FD: feature distillation (FD) and MGD are "
                               "not supported by lknets; use KD or NKD"),
    (["--distill_type", "NKD_MGD"], "MGD are not supported"),
    (["--distill_type", "DKD"], "--distill_type must be one of KD, NKD, None, got 'DKD'"),
    (["--T", "0"], "--T must be a positive temperature, got 0.0"),
    (["--T", "nan"], "--T must be a positive temperature, got nan"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1], got 1.5"),
    (["--gamma", "-1"], "--gamma must be a finite number >= 0, got -1.0"),
    (["--distill_type", "NKD", "--hard"], "--hard is a form of KD"),
    (["--eval", "true"], "evaluate a model with main.py --eval true"),
    (["--model_s", "convnext_attto"], "--model_s: unknown model 'convnext_attto'"),
    (["--variant", "1d"], "--variant is a flag of the convnext"),
])
def test_bad_flags_give_one_line(flags, expected, teacher_file, capsys):
    msg = cli_error(TEACHER + FAST + ["--resume", str(teacher_file)] + flags, capsys)
    assert expected in msg


def test_kd_without_a_teacher_file(capsys):
    msg = cli_error(TEACHER + FAST, capsys)
    assert msg == ("error: --distill_type KD needs the teacher's weights: pass --resume "
                   "TEACHER_CHECKPOINT (with --model and its family flags)")


def test_teacher_weights_of_another_model(teacher_file, capsys):
    msg = cli_error(FAST + ["--model", "convnext_atto", "--resume", str(teacher_file),
                            "--train_subset", "32"], capsys)
    assert f"teacher checkpoint {teacher_file} does not fit model convnext_atto" in msg


def test_output_dir_of_another_run_is_not_resumed(teacher_file, tmp_path, capsys):
    """A folder holding the teacher's own training run is not taken for the student's."""
    utils.atomic_save({"model": {}, "epoch": 4, "args": argparse.Namespace(model="SLaK_tiny")},
                      str(tmp_path / "checkpoint-4.pth"))
    msg = cli_error(TEACHER + FAST + ["--resume", str(teacher_file), "--output_dir",
                                      str(tmp_path)], capsys)
    assert msg == (f"error: --output_dir {tmp_path} holds {tmp_path / 'checkpoint-4.pth'}, a "
                   "checkpoint of a main.py run of SLaK_tiny, not of a distillation into "
                   "convnext_atto: give the distillation its own --output_dir")


def test_help_says_how_nkd_differs_from_slaks_code(capsys):
    with pytest.raises(SystemExit) as exc:
        main_KD.cli(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "SLaK's released NKD differs: no CE on the labels, and T = 1" in text
    assert "--model_s" in text and "--lr_fd" in text and "--gamma" in text


# --------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(teacher_file, tmp_path):
    """The teacher runs on each process's share of the batch; the student's update is that of
    one process with the whole batch (no BN in the student, no mixup)."""
    from test_distributed import free_port

    argv = ["main_KD.py", *TEACHER, *FAST, "--resume", str(teacher_file), "--distill_type",
            "NKD", "--T", "2", "--mixup", "0", "--cutmix", "0", "--train_subset", "64",
            "--epochs", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = []
    for nproc, batch in ((1, "32"), (2, "16")):
        out = tmp_path / f"n{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *argv, "--batch_size", batch,
               "--output_dir", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs.append(out)
    one, two = (load(out / "checkpoint-0.pth")["model"] for out in outs)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    logs = [read_log(out)[0] for out in outs]
    assert logs[1]["test_acc1"] == pytest.approx(logs[0]["test_acc1"], abs=1e-6)
    assert logs[1]["train_loss_nkd_target"] == pytest.approx(logs[0]["train_loss_nkd_target"],
                                                             rel=1e-4)
