"""lknets: distil a trained teacher into a student (SLaK's ``main_KD.py``, e.g. its
large-to-small kernel "ConvNeXt L2S").

The flags are main.py's plus upstream main_KD's. ``--model`` with its family flags is the
teacher, loaded strictly from ``--resume`` and only ever run in eval mode under ``no_grad``;
``--model_s`` is the student, which main.py trains as it trains any model (data, schedules,
EMA, checkpoints and resume, DDP, AMP, sparse training) with the distillation loss of
distill.py as its criterion. Upstream's README commands run unchanged, e.g.::

    python -m torch.distributed.launch --nproc_per_node=4 main_KD.py --resume SLaK_small.pth \\
        --Decom True --T 3.0 --width_factor 1.3 -u 2000 --distill_resume --lr_fd 3e-5 \\
        --epochs 300 --model SLaK_small --distill_type NKD --model_s SLaK_small ...
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

import main as lk_main
import models
import utils
from datasets import report_skipped
from distill import DISTILL_TYPES, DistillationLoss
from engine import evaluate
from utils import UserError, exit_status

# Upstream's student for --model_s SLaK_*: ConvNeXt's 7x7 kernels in SLaK's block form (no small
# branch, since N = 100 > 7), so the released "ConvNeXt L2S" checkpoints load.
L2S_KERNEL_SIZE = [7, 7, 7, 7, 100]

# Upstream flags of its feature distillation (FD) and MGD, which lknets does not implement:
# parsed so that upstream's commands run (the README's NKD command passes --lr_fd), with a note
# when one is set, since they change nothing (as with upstream's KD and NKD).
FD_MGD_FLAGS = {"lr_fd": 1.0, "FDLoss_type": "smoothL1", "alpha_mgd": 7e-5, "lambda_mgd": 0.5,
                "feature_n": 1, "target_Lnorm": False}


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's parser plus the distillation flags of SLaK's main_KD.py (and ``--gamma``)."""
    parser = lk_main.get_args_parser()
    group = parser.add_argument_group(
        "distillation (--model and --resume are the teacher, --model_s the student)")
    group.add_argument("--model_s", default="SLaK_small", type=str, metavar="MODEL",
                       help="the student, any registered model; SLaK_tiny, SLaK_small, ... "
                            "build upstream's student: the ConvNeXt shape with 7x7 kernels in "
                            "SLaK's block form (kernel_size 7 7 7 7 100, width_factor 1, no "
                            "Decom), keyed as SLaK's released ConvNeXt L2S checkpoints. The "
                            "family flags (--kernel_size, --variant, ...) shape the teacher "
                            "(default: SLaK_small)")
    group.add_argument("--distill_type", default="KD", type=str,
                       help="KD: alpha*T^2*KL(teacher||student at temperature T) + "
                            "(1-alpha)*CE(labels). NKD, as its authors define it (Yang et al., "
                            "ICCV 2023): CE(labels) + the target term (the student's log-prob "
                            "of the label weighted by the teacher's prob) + gamma*T^2*CE of "
                            "the non-target distributions at temperature T. SLaK's released "
                            "NKD differs: no CE on the labels, and T = 1 and weight 1 whatever "
                            "--T/--alpha say. None: the student alone, with main.py's loss (a "
                            "--resume teacher is still evaluated). Upstream's FD and MGD are "
                            "not supported (default: KD)")
    group.add_argument("--T", default=1.0, type=float,
                       help="temperature of KD and of NKD's non-target term (default: 1.0)")
    group.add_argument("--alpha", default=0.1, type=float,
                       help="KD: weight of the distillation term; the CE on the labels gets "
                            "1 - alpha (default: 0.1)")
    group.add_argument("--gamma", default=1.5, type=float,
                       help="NKD: weight of the non-target term (default: 1.5, the authors')")
    group.add_argument("--hard", action="store_true",
                       help="KD on the teacher's argmax labels instead: "
                            "0.5*CE(labels) + 0.5*CE(teacher's argmax)")
    group.add_argument("--distill_resume", action="store_true",
                       help="resume the student from its newest checkpoint in --output_dir, "
                            "also with --auto_resume false; the teacher's --resume file is "
                            "never loaded into the student")
    fd_mgd = parser.add_argument_group(
        "upstream's FD/MGD flags: accepted so its commands run; no effect")
    fd_mgd.add_argument("--lr_fd", default=FD_MGD_FLAGS["lr_fd"], type=float)
    fd_mgd.add_argument("--FDLoss_type", default=FD_MGD_FLAGS["FDLoss_type"],
                        choices=["smoothL1", "MSE"])
    fd_mgd.add_argument("--alpha_mgd", default=FD_MGD_FLAGS["alpha_mgd"], type=float)
    fd_mgd.add_argument("--lambda_mgd", default=FD_MGD_FLAGS["lambda_mgd"], type=float)
    fd_mgd.add_argument("--feature_n", default=FD_MGD_FLAGS["feature_n"], type=int)
    fd_mgd.add_argument("--target_Lnorm", action="store_true")
    return parser


def check_distill_args(args: argparse.Namespace) -> None:
    """Reject distillation flags that cannot work, before any data or model is touched."""
    kind = args.distill_type
    if "FD" in kind or "MGD" in kind:  # upstream picks the loss by substring, e.g. NKD_FD
        raise UserError(f"--distill_type {kind}: feature distillation (FD) and MGD are not "
                        "supported by lknets; use KD or NKD")
    if kind not in DISTILL_TYPES:
        raise UserError(f"--distill_type must be one of {', '.join(DISTILL_TYPES)}, got {kind!r}")
    if args.eval:
        raise UserError("main_KD.py trains a student; evaluate a model with main.py --eval true")
    if not 0 < args.T < float("inf"):  # also refuses nan
        raise UserError(f"--T must be a positive temperature, got {args.T}")
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    if not 0 <= args.gamma < float("inf"):
        raise UserError(f"--gamma must be a finite number >= 0, got {args.gamma}")
    if args.hard and kind != "KD":
        raise UserError(f"--hard is a form of KD; it does not apply to --distill_type {kind}")
    if kind != "None" and not args.resume:
        raise UserError(f"--distill_type {kind} needs the teacher's weights: pass --resume "
                        "TEACHER_CHECKPOINT (with --model and its family flags)")


def student_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags main.py trains the student with: ``--model_s`` as the model, the family flags
    of upstream's student for SLaK names (none otherwise), and resume only from the student's
    own checkpoints. The teacher is recorded under ``teacher`` (saved in every checkpoint)."""
    try:
        family = models.get_family(args.model_s).name
    except ValueError as err:
        raise UserError(f"--model_s: {err}") from err
    student = argparse.Namespace(**vars(args))
    student.model = args.model_s
    for dest in models.registry.family_flags():
        setattr(student, dest, None)
    if family == "slak":
        student.kernel_size, student.width_factor = list(L2S_KERNEL_SIZE), 1.0
        student.Decom, student.bn = False, args.bn
    student.deploy = False
    student.resume = ""
    student.auto_resume = args.auto_resume or args.distill_resume
    student.teacher = {"model": args.model, "resume": args.resume,
                       **models.family_kwargs(args.model, args)}
    return student


def check_resume_source(student: argparse.Namespace) -> None:
    """The checkpoint auto-resume would load must be one of a distillation into this student:
    a folder holding, say, the teacher's own training run is refused, not resumed from."""
    if not (student.auto_resume and student.output_dir):
        return
    for epoch in utils.checkpoint_epochs(student.output_dir):
        path = utils.checkpoint_path(student.output_dir, epoch)
        try:
            ckpt = utils.read_checkpoint(path, student.trust_checkpoint, mmap=True)
        except Exception:  # main.py's auto-resume skips it with a warning
            continue
        run = ckpt.get("args") if isinstance(ckpt, dict) else None
        model = getattr(run, "model", None)
        if getattr(run, "distill_type", None) is None or model != student.model:
            what = (f"a distillation into {model}" if hasattr(run, "distill_type") else
                    f"a main.py run of {model}" if model else "another run")
            raise UserError(f"--output_dir {student.output_dir} holds {path}, a checkpoint of "
                            f"{what}, not of a distillation into {student.model}: give the "
                            "distillation its own --output_dir")
        return


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_teacher(args: argparse.Namespace, nb_classes: int,
                 device: torch.device) -> torch.nn.Module:
    """``--model`` from ``--resume`` (strict), in eval mode without gradients, on ``device``.

    Its re-parameterized form is used when it has fewer weights (RepLKNet, UniRepLKNet, SLaK
    without Decom: one conv per block instead of several, the same function in eval mode); SLaK's
    decomposed strips are kept, since merged into one k x k kernel they would cost more.
    """
    ckpt = utils.load_checkpoint_file(args.resume, args.trust_checkpoint)
    # Drop path and activation checkpointing only act in training.
    teacher_args = argparse.Namespace(**{**vars(args), "drop_path": 0.0, "use_checkpoint": False})
    teacher = lk_main.build_model(teacher_args, nb_classes)
    utils.load_state_dict_strict(teacher, utils.extract_state_dict(ckpt),
                                 f"teacher checkpoint {args.resume}", args.model,
                                 lk_main.other_form_hint(teacher_args, nb_classes))
    size = _num_params(teacher)
    merged = models.reparameterize_model(copy.deepcopy(teacher).eval())
    note = ""
    if _num_params(merged) < size:
        teacher, note = merged, f", re-parameterized to {_num_params(merged) / 1e6:.2f}M"
    print(f"Teacher {args.model} from {args.resume}: {size / 1e6:.2f}M parameters{note}")
    # Set last: re-parameterizing creates new convs, trainable and in training mode.
    return teacher.eval().requires_grad_(False).to(device)


def attach_teacher(args: argparse.Namespace) -> lk_main.CriterionHook:
    """main.py's criterion hook: loads and evaluates the teacher and returns the distillation
    loss around main.py's criterion (or that criterion itself with --distill_type None)."""
    amp_dtype = lk_main.AMP_DTYPES[args.amp_dtype] if args.use_amp else None

    def hook(criterion: torch.nn.Module, nb_classes: int, device: torch.device,
             val_loader: Optional[DataLoader]) -> Any:
        set_flags = [f"--{name}" for name, default in FD_MGD_FLAGS.items()
                     if getattr(args, name) != default]
        if set_flags:
            print(f"Note: FD/MGD flags have no effect (lknets implements neither): "
                  f"{', '.join(set_flags)}")
        if not args.resume:
            return criterion
        teacher = load_teacher(args, nb_classes, device)
        if val_loader is not None:
            stats = evaluate(val_loader, teacher, device, amp_dtype, header="Test (teacher):")
            report_skipped(val_loader, "evaluation (teacher)", device)
            print(f"Accuracy of the teacher on the test images: {stats['acc1']:.1f}%")
        if args.distill_type == "None":
            return criterion
        return DistillationLoss(teacher, criterion, args.distill_type, T=args.T,
                                alpha=args.alpha, gamma=args.gamma, hard=args.hard)

    return hook


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Distil ``--model`` (``--resume``) into ``--model_s``; returns the last epoch's stats."""
    check_distill_args(args)
    lk_main.validate_args(args)  # the teacher: --model with its family flags
    student = student_args(args)
    check_resume_source(student)
    # Under DDP a collective that fails names the rank main.py gave the student's flags.
    with utils.peer_failures_reported(student):
        return lk_main.main(student, attach_teacher(args))


def cli(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        "lknets distillation", parents=[get_args_parser()],
        description="Train --model_s with knowledge distilled from --model, whose weights "
                    "--resume names. Everything else is as in main.py, applied to the student.")
    args = parser.parse_args(argv)
    return exit_status(lambda: main(args))


if __name__ == "__main__":
    sys.exit(cli())
