"""lknets: train and evaluate large-kernel ConvNets.

The flags are those of ConvNeXt's main.py (same names, types and defaults), plus each model
family's own flags, so the upstream READMEs' commands run unchanged.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.backends.cudnn as cudnn
from timm.data.mixup import Mixup
from timm.optim import create_optimizer_v2, list_optimizers
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV2
from torch.utils.data import DataLoader, DistributedSampler

import kernels.plan
import modalities
import models
import utils
from datasets import (DATA_SETS, EpochSeededDataset, build_dataset, report_skipped,
                      resolve_input_size)
from engine import evaluate, evaluate_forecast, train_one_epoch
from optim_factory import create_optimizer
from sparse import Masking, add_sparse_args
from utils import UserError, exit_status, str2bool

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("lknets training and evaluation", add_help=False)
    parser.add_argument("--batch_size", default=64, type=int, help="Per GPU batch size")
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")

    # Model
    parser.add_argument("--model", default="convnext_tiny", type=str, metavar="MODEL",
                        help="Name of model to train (see models.list_models())")
    parser.add_argument("--drop_path", type=float, default=0, metavar="PCT",
                        help="Drop path rate (default: 0.0)")
    parser.add_argument("--lk_impl", default="auto", choices=["auto", "cuda", "torch"],
                        help="large-kernel depthwise conv: lknets' CUDA kernel where it measured "
                             "faster (auto), always (cuda), or torch's (default: auto)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="run the model through torch.compile, in MODE (default: no "
                             "compile; the flag alone: default mode). reduce-overhead adds CUDA "
                             "graphs: models with many small kernels (UniRepLKNet) train up to "
                             "2x faster with it (benchmarks/RESULTS.md)")
    parser.add_argument("--input_size", default=None, type=int,
                        help="image side (default 224); for audio, time-series, video and point "
                             "data sets what modalities.DATA_SETS says (fbank frames, window "
                             "length, frame side, view side), with its own default")
    parser.add_argument("--test_size", default=-1, type=int,
                        help="eval image size; -1 uses --input_size")
    parser.add_argument("--layer_scale_init_value", default=1e-6, type=float,
                        help="Layer scale initial values")
    parser.add_argument("--use_checkpoint", type=str2bool, default=False,
                        help="trade compute for memory with torch.utils.checkpoint")
    parser.add_argument("--deploy", type=str2bool, default=False,
                        help="build the re-parameterized (deploy) form, to load deploy weights")
    parser.add_argument("--with_small_kernel_merged", type=str2bool, default=False,
                        help="re-parameterize the loaded model before evaluating (with --eval)")

    # Beyond images (modalities/: --data_set speech_commands, co2, macrodata, gunpoint,
    # basicmotions, japanese_vowels, synthetic_video, synthetic_points)
    parser.add_argument("--pred_len", default=24, type=int,
                        help="forecasting data sets: steps to forecast (default: 24)")
    parser.add_argument("--d_model", default=None, type=int,
                        help="time series: embedding width per step; seq_len x d_model must be "
                             "a square, the backbone's image (default: seq_len)")
    parser.add_argument("--freqm", default=48, type=int,
                        help="speech_commands: SpecAugment frequency mask (default: 48)")
    parser.add_argument("--timem", default=48, type=int,
                        help="speech_commands: SpecAugment time mask (default: 48)")

    # EMA
    parser.add_argument("--model_ema", type=str2bool, default=False)
    parser.add_argument("--model_ema_decay", type=float, default=0.9999)
    parser.add_argument("--model_ema_force_cpu", type=str2bool, default=False)
    parser.add_argument("--model_ema_eval", type=str2bool, default=False,
                        help="Using ema to eval during training.")

    # Optimizer
    parser.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER",
                        help='Optimizer (default: "adamw"')
    parser.add_argument("--opt_eps", default=1e-8, type=float, metavar="EPSILON",
                        help="Optimizer Epsilon (default: 1e-8)")
    parser.add_argument("--opt_betas", default=None, type=float, nargs="+", metavar="BETA",
                        help="Optimizer Betas (default: None, use opt default)")
    parser.add_argument("--clip_grad", type=float, default=None, metavar="NORM",
                        help="Clip gradient norm (default: None, no clipping)")
    parser.add_argument("--momentum", type=float, default=0.9, metavar="M",
                        help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight_decay", type=float, default=0.05,
                        help="weight decay (default: 0.05)")
    parser.add_argument("--weight_decay_end", type=float, default=None,
                        help="Final value of the weight decay (cosine schedule)")
    parser.add_argument("--lr", type=float, default=4e-3, metavar="LR",
                        help="learning rate (default: 4e-3), with total batch size 4096")
    parser.add_argument("--layer_decay", type=float, default=1.0,
                        help="layer-wise lr decay (1.0 = off)")
    parser.add_argument("--min_lr", type=float, default=1e-6, metavar="LR",
                        help="lower lr bound for cyclic schedulers that hit 0 (1e-6)")
    parser.add_argument("--warmup_epochs", type=int, default=20, metavar="N",
                        help="epochs to warmup LR, if scheduler supports")
    parser.add_argument("--warmup_steps", type=int, default=-1, metavar="N",
                        help="num of steps to warmup LR, will overload warmup_epochs if set > 0")

    # Augmentation
    parser.add_argument("--color_jitter", type=float, default=0.4, metavar="PCT",
                        help="Color jitter factor (default: 0.4)")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                        help='AutoAugment policy, e.g. "v0", "original" or "none"')
    parser.add_argument("--smoothing", type=float, default=0.1,
                        help="Label smoothing (default: 0.1)")
    parser.add_argument("--train_interpolation", type=str, default="bicubic",
                        help='Training interpolation (random, bilinear, bicubic default: "bicubic")')
    parser.add_argument("--crop_pct", type=float, default=None)
    parser.add_argument("--reprob", type=float, default=0.25, metavar="PCT",
                        help="Random erase prob (default: 0.25)")
    parser.add_argument("--remode", type=str, default="pixel",
                        help='Random erase mode (default: "pixel")')
    parser.add_argument("--recount", type=int, default=1, help="Random erase count (default: 1)")
    parser.add_argument("--resplit", type=str2bool, default=False,
                        help="accepted for upstream compatibility; no effect (as in ConvNeXt)")
    parser.add_argument("--mixup", type=float, default=0.8,
                        help="mixup alpha, mixup enabled if > 0.")
    parser.add_argument("--cutmix", type=float, default=1.0,
                        help="cutmix alpha, cutmix enabled if > 0.")
    parser.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                        help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    parser.add_argument("--mixup_prob", type=float, default=1.0,
                        help="Probability of performing mixup or cutmix")
    parser.add_argument("--mixup_switch_prob", type=float, default=0.5,
                        help="Probability of switching to cutmix when both are enabled")
    parser.add_argument("--mixup_mode", type=str, default="batch",
                        help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')

    # Fine-tuning
    parser.add_argument("--finetune", default="", help="finetune from checkpoint")
    parser.add_argument("--head_init_scale", default=1.0, type=float,
                        help="classifier head initial scale, typically adjusted in fine-tuning")
    parser.add_argument("--model_key", default="model|module", type=str,
                        help="which key to load from saved state dict, usually model or model_ema")
    parser.add_argument("--model_prefix", default="", type=str)
    parser.add_argument("--trust_checkpoint", type=str2bool, default=False,
                        help="load --resume/--finetune/auto-resume checkpoints without the "
                             "weights-only guard: unpickling can then run code from the file, "
                             "so only for files you trust (default: weights only, which every "
                             "lknets and upstream release checkpoint passes)")

    # Data
    parser.add_argument("--data_path", default=None, type=str,
                        help="dataset path (default: the embedded Fashion-MNIST)")
    parser.add_argument("--eval_data_path", default=None, type=str,
                        help="dataset path for evaluation")
    parser.add_argument("--nb_classes", default=None, type=int,
                        help="number of classes (default: the dataset's)")
    parser.add_argument("--imagenet_default_mean_and_std", type=str2bool, default=True)
    parser.add_argument("--data_set", default=None, choices=DATA_SETS, type=str,
                        help="dataset type (default: fashion_mnist without --data_path, "
                             "IMNET with one)")
    parser.add_argument("--train_subset", default=0, type=int,
                        help="train on a class-balanced subset of this many images (0 = all)")
    parser.add_argument("--eval_subset", default=0, type=int,
                        help="evaluate on a class-balanced subset of this many images (0 = all)")
    parser.add_argument("--skip_bad_images", type=str2bool, default=False,
                        help="replace images that cannot be decoded (truncated, corrupt) by the "
                             "next readable one, with a warning naming each file and a count "
                             "per epoch (default: stop with an error naming the file)")
    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--log_dir", default=None, help="path where to tensorboard log")
    parser.add_argument("--device", default="cuda", help="device to use for training / testing")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint")
    parser.add_argument("--auto_resume", type=str2bool, default=True)
    parser.add_argument("--save_ckpt", type=str2bool, default=True)
    parser.add_argument("--save_ckpt_freq", default=1, type=int)
    parser.add_argument("--save_ckpt_num", default=3, type=int)
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", type=str2bool, default=False, help="Perform evaluation only")
    parser.add_argument("--eval_random_init", type=str2bool, default=False,
                        help="allow --eval without weights to load (--resume, --finetune or a "
                             "checkpoint in --output_dir): evaluates the random initialization")
    parser.add_argument("--dist_eval", type=str2bool, default=True,
                        help="Enabling distributed evaluation")
    parser.add_argument("--disable_eval", type=str2bool, default=False,
                        help="Disabling evaluation during training")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", type=str2bool, default=True,
                        help="Pin CPU memory in DataLoader for more efficient transfer to GPU.")

    # Distributed
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--use_sync_bn", type=str2bool, default=False,
                        help="convert BatchNorm to SyncBatchNorm across processes (upstream "
                             "RepLKNet and SLaK forced it; it costs speed, see benchmarks)")
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", type=str2bool, default=False)
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--dist_timeout", default=30.0, type=float, metavar="MINUTES",
                        help="how long a collective waits for the other processes before the "
                             "job stops with an error, instead of hanging when one of them "
                             "stopped or hangs (default: 30)")

    # Precision
    parser.add_argument("--use_amp", type=str2bool, default=False,
                        help="Use PyTorch's AMP (Automatic Mixed Precision) or not")
    parser.add_argument("--amp_dtype", default="float16", choices=sorted(AMP_DTYPES),
                        help="autocast dtype with --use_amp (bfloat16 needs no loss scaling)")

    models.add_family_args(parser)
    add_sparse_args(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later or silently do something else."""
    modality = modalities.get(args.data_set)
    resolve_input_size(args)

    def positive(name: str) -> None:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}")

    for name in ("batch_size", "epochs", "update_freq", "input_size", "save_ckpt_freq"):
        positive(name)
    if not 0 < args.dist_timeout < float("inf"):  # also refuses nan
        raise UserError(f"--dist_timeout must be a positive number of minutes, "
                        f"got {args.dist_timeout}")
    if not 0 < args.layer_decay <= 1:
        raise UserError(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
    if not 0 <= args.drop_path < 1:
        raise UserError(f"--drop_path must be in [0, 1), got {args.drop_path}")
    if not 0 <= args.smoothing < 1:
        raise UserError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if not 0 < args.model_ema_decay < 1:
        raise UserError(f"--model_ema_decay must be in (0, 1), got {args.model_ema_decay}")
    if args.train_subset < 0 or args.eval_subset < 0:
        raise UserError("--train_subset and --eval_subset must be >= 0")
    if args.mixup_mode not in ("batch", "pair", "elem"):
        raise UserError(f"--mixup_mode must be batch, pair or elem, got {args.mixup_mode!r}")
    if args.with_small_kernel_merged and not args.eval:
        raise UserError("--with_small_kernel_merged re-parameterizes for evaluation; "
                        "use it with --eval true")
    for name in ("lr", "min_lr", "weight_decay"):
        value = getattr(args, name)
        if not 0 <= value < float("inf"):  # also refuses nan
            raise UserError(f"--{name} must be a finite number >= 0, got {value}")
    if args.warmup_epochs < 0:
        raise UserError(f"--warmup_epochs must be >= 0, got {args.warmup_epochs}")
    if args.clip_grad is not None and not 0 < args.clip_grad < float("inf"):
        raise UserError(f"--clip_grad must be a positive number, got {args.clip_grad}")
    if args.eval and not (args.resume or args.finetune or args.eval_random_init or (
            args.auto_resume and args.output_dir and utils.checkpoint_epochs(args.output_dir))):
        raise UserError("--eval true but no weights to evaluate: pass --resume CHECKPOINT (or "
                        "--finetune), or --eval_random_init true to evaluate random weights")
    try:
        models.get_family(args.model)
        models.family_kwargs(args.model, args)
    except ValueError as err:  # unknown --model lists the registered names; bad family flags
        raise UserError(str(err)) from err
    check_optimizer(args)
    if modality is None:
        check_input_size(args)
    else:
        check_modality_args(args, modality)
    for flag in ("output_dir", "log_dir"):
        if getattr(args, flag):
            check_writable_dir(getattr(args, flag), f"--{flag}")


def check_modality_args(args: argparse.Namespace, modality: modalities.Modality) -> None:
    """Flags of the image pipeline that a non-image --data_set cannot honour."""
    if args.layer_decay != 1.0:
        raise UserError(f"--layer_decay applies to image data sets, not to --data_set "
                        f"{args.data_set} ({modality.kind})")
    if args.pred_len <= 0:
        raise UserError(f"--pred_len must be > 0, got {args.pred_len}")
    for flag in ("freqm", "timem"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.d_model is not None and args.d_model <= 0:
        raise UserError(f"--d_model must be > 0, got {args.d_model}")


def check_optimizer(args: argparse.Namespace) -> None:
    """An unknown --opt fails here, not after the data and the model are set up."""
    try:
        create_optimizer_v2([torch.nn.Parameter(torch.zeros(1))], opt=args.opt, lr=1.0)
    except (ValueError, AssertionError, ImportError) as err:
        raise UserError(f"--opt {args.opt} is not usable: {err}; timm's optimizers are: "
                        f"{', '.join(list_optimizers())}") from err


# Every family downsamples by at most 32, so inputs from this size on always fit; smaller ones
# are tried through the model (on the meta device: no memory, no compute).
_ALWAYS_FITS = 64


def check_input_size(args: argparse.Namespace) -> None:
    """--input_size / --test_size too small for the model's downsampling: say the minimum."""
    sizes = sorted({s for s in (args.input_size, args.test_size) if 0 < s < _ALWAYS_FITS})
    if not sizes:
        return
    try:
        with torch.device("meta"):
            model = build_model(args, args.nb_classes or 1000).eval()
        fits = _forward_fits(model, "meta")
        fits(_ALWAYS_FITS)
    except NotImplementedError:  # a model whose forward reads tensor values: try it on the CPU
        model = build_model(args, args.nb_classes or 1000).eval()
        fits = _forward_fits(model, "cpu")
    for size in sizes:
        if not fits(size):
            low, high = size, _ALWAYS_FITS  # fits(high); find the smallest size that fits
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (low, mid) if fits(mid) else (mid, high)
            flag = "--input_size" if size == args.input_size else "--test_size"
            raise UserError(f"{flag} {size} is too small for {args.model}, whose feature maps "
                            f"shrink below one pixel; the smallest size it takes is {high}")


def _forward_fits(model: torch.nn.Module, device: str) -> Callable[[int], bool]:
    def fits(size: int) -> bool:
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size, device=device))
        except NotImplementedError:  # the device cannot run this model: not a size problem
            raise
        except RuntimeError:
            return False
        return True
    return fits


def check_writable_dir(path: str, flag: str) -> None:
    """Create ``path`` and write a probe file there, so a bad folder fails before training."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path} is not a writable folder: "
                        f"{err.strerror or err}") from err


def build_model(args: argparse.Namespace, nb_classes: int) -> torch.nn.Module:
    """--model for --data_set; beyond images, the modality's adapter around --model (for
    forecasting ``nb_classes`` is the horizon)."""
    kernels.plan.set_lk_impl(args.lk_impl)
    if modalities.get(args.data_set) is not None:
        try:
            return modalities.create_model(args.data_set, args, nb_classes,
                                           drop_path_rate=args.drop_path)
        except (TypeError, ValueError) as err:
            raise UserError(f"--model {args.model} with --data_set {args.data_set}: "
                            f"{err}") from err
    kwargs: Dict[str, Any] = {"num_classes": nb_classes, "drop_path_rate": args.drop_path}
    # Flags not every family takes are passed only when set, so a model that lacks the option
    # fails loudly instead of ignoring it.
    if args.layer_scale_init_value != 1e-6:
        kwargs["layer_scale_init_value"] = args.layer_scale_init_value
    if args.head_init_scale != 1.0:
        kwargs["head_init_scale"] = args.head_init_scale
    if args.use_checkpoint:
        kwargs["use_checkpoint"] = True
    if args.deploy:
        kwargs["deploy"] = True
    try:
        kwargs.update(models.family_kwargs(args.model, args))
        return models.create_model(args.model, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from err


def other_form_hint(args: argparse.Namespace, nb_classes: int
                    ) -> Callable[[Dict[str, torch.Tensor]], str]:
    """Advice for weights that do not fit the model: they may be of its other form (deploy,
    i.e. re-parameterized, vs training), which the --deploy flag chooses."""
    def hint(state: Dict[str, torch.Tensor]) -> str:
        other = argparse.Namespace(**{**vars(args), "deploy": not args.deploy})
        try:
            with torch.device("meta"):  # shapes only
                model = build_model(other, nb_classes)
        except UserError:  # the family has no deploy form
            return ""
        if any(utils.state_dict_mismatch(model, state)):
            return ""
        if other.deploy:
            return "it holds the deploy (re-parameterized) form: add --deploy true"
        return ("it holds the training form: drop --deploy true (or convert it with "
                "tools/reparameterize.py)")
    return hint


def build_loaders(args: argparse.Namespace):
    """(train loader or None, eval loader or None, number of classes)."""
    world_size, rank = utils.get_world_size(), utils.get_rank()
    pin_memory = args.pin_mem and str(args.device).startswith("cuda")
    train_loader = val_loader = None
    nb_classes = None
    if not args.eval:
        dataset_train, nb_classes = build_dataset(is_train=True, args=args)
        dataset_train = EpochSeededDataset(dataset_train, args.seed)
        # A DistributedSampler also on one process: its set_epoch(e) gives a resumable order.
        sampler = DistributedSampler(dataset_train, num_replicas=world_size, rank=rank,
                                     shuffle=True, seed=args.seed)
        if len(dataset_train) < args.batch_size * world_size:
            raise UserError(f"the training set has {len(dataset_train)} images, fewer than one "
                            f"batch ({args.batch_size} x {world_size} processes)")
        train_loader = DataLoader(dataset_train, sampler=sampler, batch_size=args.batch_size,
                                  num_workers=args.num_workers, pin_memory=pin_memory,
                                  drop_last=True, persistent_workers=False)
    if args.eval or not args.disable_eval:
        dataset_val, val_classes = build_dataset(is_train=False, args=args)
        if nb_classes is not None and val_classes != nb_classes:
            raise UserError(f"train data has {nb_classes} classes but eval data {val_classes}")
        nb_classes = val_classes
        indices = list(range(len(dataset_val)))
        if args.dist_eval and world_size > 1:
            indices = indices[rank::world_size]  # no padding: every image counted exactly once
        elif world_size > 1 and rank != 0:
            indices = []
        val_loader = DataLoader(torch.utils.data.Subset(dataset_val, indices),
                                batch_size=int(1.5 * args.batch_size), shuffle=False,
                                num_workers=args.num_workers, pin_memory=pin_memory,
                                drop_last=False)
    return train_loader, val_loader, nb_classes


def build_mixup(args: argparse.Namespace, nb_classes: int) -> Optional[Mixup]:
    mixup, cutmix, cutmix_minmax = args.mixup, args.cutmix, args.cutmix_minmax
    modality = modalities.get(args.data_set)
    if modality is not None:
        # Cutmix pastes image boxes and forecasts have no classes to mix: say what is off.
        dropped = [f for f, v, ok in (("--mixup", mixup, modality.mixup),
                                      ("--cutmix", cutmix, modality.cutmix)) if v > 0 and not ok]
        if dropped:
            print(f"{' and '.join(dropped)} off: not applicable to --data_set {args.data_set}")
        mixup = mixup if modality.mixup else 0.0
        cutmix, cutmix_minmax = (cutmix, cutmix_minmax) if modality.cutmix else (0.0, None)
    if not (mixup > 0 or cutmix > 0 or cutmix_minmax is not None):
        return None
    print("Mixup is activated!")
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                 cutmix_minmax=cutmix_minmax, prob=args.mixup_prob,
                 switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


# (criterion, number of classes, device, eval loader or None) -> the criterion to train with.
CriterionHook = Callable[[torch.nn.Module, int, torch.device, Optional[DataLoader]], Any]


def main(args: argparse.Namespace,
         criterion_hook: Optional[CriterionHook] = None) -> Dict[str, Any]:
    """Train (or with --eval, evaluate) as the flags say; returns the last stats.

    ``criterion_hook``, when given, is called once before the first epoch with the training
    criterion and returns the one to train with instead (main_KD.py: a distillation loss
    around it, with the teacher).
    """
    validate_args(args)
    utils.init_distributed_mode(args)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but CUDA is not available; pass --device cpu")
    device = torch.device(args.device)
    # The same seed on every rank: identical initial weights, so each rank's EMA copy (made
    # before DDP broadcasts rank 0's weights) starts equal. Per-rank randomness is seeded per
    # epoch in train() and per sample by EpochSeededDataset.
    utils.seed_everything(args.seed)
    cudnn.benchmark = True
    amp_dtype = AMP_DTYPES[args.amp_dtype] if args.use_amp else None

    train_loader, val_loader, nb_classes = build_loaders(args)
    args.nb_classes = nb_classes
    mixup_fn = build_mixup(args, nb_classes) if train_loader is not None else None

    model = build_model(args, nb_classes)
    weights_hint = other_form_hint(args, nb_classes)
    if args.finetune:
        utils.load_finetune(args, model, weights_hint)
    model.to(device)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV2(model, decay=args.model_ema_decay,
                               device="cpu" if args.model_ema_force_cpu else None)
        print(f"Using EMA with decay = {args.model_ema_decay:.8f}")
    model_without_ddp = model
    if args.distributed:
        if args.use_sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model_without_ddp = model
            print("Using SyncBatchNorm")
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    if args.compile:
        # Checkpoints and the EMA use model_without_ddp: no `_orig_mod.` prefix in their keys.
        model = torch.compile(model, mode=None if args.compile == "default" else args.compile)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"Model {args.model}: {n_parameters / 1e6:.2f}M trainable parameters")

    optimizer = create_optimizer(args, model_without_ddp)
    loss_scaler = utils.LossScaler(enabled=amp_dtype == torch.float16, device_type=device.type)
    checkpoint = utils.auto_load_model(args, model_without_ddp, optimizer, loss_scaler, model_ema,
                                       weights_hint)

    if args.eval:
        return run_eval(args, model, model_without_ddp, model_ema, val_loader, device, amp_dtype)
    masking = build_masking(args, model_without_ddp, optimizer, loss_scaler, train_loader,
                            checkpoint) if args.sparse else None
    return train(args, model, model_without_ddp, model_ema, optimizer, loss_scaler, train_loader,
                 val_loader, mixup_fn, device, amp_dtype, n_parameters, masking, criterion_hook)


def build_masking(args, model_without_ddp, optimizer, loss_scaler, train_loader,
                  checkpoint: Optional[Dict[str, Any]]) -> Masking:
    """SLaK sparse masks: restored from the resumed checkpoint, else drawn by --sparse_init."""
    try:
        masking = Masking(model_without_ddp, optimizer, args, len(train_loader) // args.update_freq,
                          args.start_epoch, grad_scaler=loss_scaler)
        if checkpoint is not None and "masks" in checkpoint:
            masking.load_state_dict(checkpoint["masks"])
            print(f"Restored {len(checkpoint['masks'])} sparse masks from {checkpoint['_path']}")
        else:
            masking.init(train_loader)
    except (ValueError, KeyError) as err:
        raise UserError(f"--sparse: {err}") from err
    print(masking.density_report(per_layer=args.verbose))
    return masking


def ema_device(model_ema: ModelEmaV2) -> torch.device:
    """Where the EMA copy lives: the CPU with --model_ema_force_cpu, else the model's device."""
    return next(model_ema.module.parameters()).device


class Score:
    """How evaluations are ranked: top-1 accuracy (higher is better), or for forecasting data
    sets the MSE (lower is better); keeps the best value seen, starting from a resumed run's
    log so it does not overwrite a better checkpoint-best.pth."""

    def __init__(self, args: argparse.Namespace) -> None:
        modality = modalities.get(args.data_set)
        forecasting = modality is not None and modality.task == "forecasting"
        self.evaluate = evaluate_forecast if forecasting else evaluate
        self.key, self.higher = ("mse", False) if forecasting else ("acc1", True)
        self.what = "MSE of {} on the test windows: {:.5f}" if forecasting else \
            "Accuracy of {} on the test images: {:.5f}%"
        self.best: Dict[str, float] = {}

    def report(self, stats: Dict[str, float], who: str) -> None:
        print(self.what.format(who, stats[self.key]))

    def restore(self, history: List[Dict[str, Any]], suffix: str) -> None:
        seen = [row[f"test_{self.key}{suffix}"] for row in history
                if f"test_{self.key}{suffix}" in row]
        if seen:
            self.best[suffix] = max(seen) if self.higher else min(seen)

    def improved(self, stats: Dict[str, float], suffix: str = "") -> bool:
        """Records ``stats`` of the model (suffix "") or its EMA ("_ema"); True when best."""
        value, best = stats[self.key], self.best.get(suffix)
        better = best is None or (value > best if self.higher else value < best)
        if better:
            self.best[suffix] = value
        label = "accuracy" if self.higher else "MSE"
        print(f"{'Max' if self.higher else 'Min'}{' EMA' if suffix else ''} {label}: "
              f"{self.best[suffix]:.{2 if self.higher else 5}f}{'%' if self.higher else ''}")
        return better


def run_eval(args, model, model_without_ddp, model_ema, val_loader, device, amp_dtype):
    if args.with_small_kernel_merged:
        models.reparameterize_model(model_without_ddp)
        print(f"Re-parameterized {args.model} for evaluation")
    score = Score(args)
    stats = score.evaluate(val_loader, model, device, amp_dtype)
    report_skipped(val_loader, "evaluation", device)
    score.report(stats, "the network")
    if model_ema is not None and args.model_ema_eval:
        if args.with_small_kernel_merged:
            models.reparameterize_model(model_ema.module)
        ema_stats = score.evaluate(val_loader, model_ema.module, ema_device(model_ema), amp_dtype,
                                   header="Test (EMA):")
        report_skipped(val_loader, "evaluation (EMA)", device)
        score.report(ema_stats, "the model EMA")
        stats.update({f"{k}_ema": v for k, v in ema_stats.items()})
    return stats


def train(args, model, model_without_ddp, model_ema, optimizer, loss_scaler, train_loader,
          val_loader, mixup_fn, device, amp_dtype, n_parameters, masking=None,
          criterion_hook: Optional[CriterionHook] = None):
    world_size = utils.get_world_size()
    total_batch = args.batch_size * args.update_freq * world_size
    steps_per_epoch = len(train_loader) // args.update_freq
    if steps_per_epoch == 0:
        raise UserError(f"--update_freq {args.update_freq} is larger than the {len(train_loader)} "
                        "batches of an epoch")
    print(f"LR = {args.lr:.8f}; batch size = {total_batch} "
          f"({args.batch_size} per process x {args.update_freq} accumulation x {world_size} "
          f"processes); {steps_per_epoch} updates per epoch; "
          f"{len(train_loader.dataset)} training images")

    lr_schedule = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch,
                                         args.warmup_epochs, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    modality = modalities.get(args.data_set)
    if modality is not None and modality.task == "forecasting":
        criterion: torch.nn.Module = torch.nn.MSELoss()
    elif mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    if criterion_hook is not None:
        criterion = criterion_hook(criterion, args.nb_classes, device, val_loader)
    print(f"criterion = {criterion}")

    log_writer = None
    if args.log_dir and utils.is_main_process():
        # A resumed run hides the scalars a killed run logged past the resumed epoch's start.
        log_writer = utils.TensorboardLogger(
            args.log_dir, purge_step=args.start_epoch * steps_per_epoch or None)
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        for path in utils.remove_stale_temp_files(args.output_dir):
            print(f"Removed {path}, left by a writer that was killed")

    score = Score(args)
    if args.output_dir and utils.is_main_process():
        # Epochs from start_epoch on are trained again: drop their old lines.
        history = utils.trim_json_log(args.output_dir, args.start_epoch)
        score.restore(history, "")
        score.restore(history, "_ema")
    stats: Dict[str, Any] = {}
    if args.start_epoch >= args.epochs:
        print(f"Nothing to train: the run is at epoch {args.start_epoch} of {args.epochs} "
              "(raise --epochs, or use a new --output_dir)")
    print(f"Start training for {args.epochs} epochs (from epoch {args.start_epoch})")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        utils.seed_everything(utils.epoch_seed(args.seed, epoch))
        train_loader.sampler.set_epoch(epoch)
        train_loader.dataset.set_epoch(epoch)
        if log_writer is not None:
            log_writer.set_step(epoch * steps_per_epoch)
        train_stats = train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, loss_scaler,
            args.clip_grad, model_ema, mixup_fn, log_writer=log_writer,
            start_steps=epoch * steps_per_epoch, lr_schedule_values=lr_schedule,
            wd_schedule_values=wd_schedule, num_training_steps_per_epoch=steps_per_epoch,
            update_freq=args.update_freq, amp_dtype=amp_dtype, masking=masking)
        report_skipped(train_loader, f"epoch {epoch} (train)", device)
        extra = {"masks": masking.state_dict()} if masking is not None else None
        stats = {**{f"train_{k}": v for k, v in train_stats.items()}}
        if masking is not None:
            stats["sparse_density"] = masking.densities()["total"]
            print(masking.density_report(per_layer=args.verbose))
        if val_loader is not None:
            test_stats = score.evaluate(val_loader, model, device, amp_dtype)
            report_skipped(val_loader, f"epoch {epoch} (eval)", device)
            score.report(test_stats, "the model")
            if score.improved(test_stats) and args.output_dir and args.save_ckpt:
                utils.save_model(args, epoch, model_without_ddp, optimizer, loss_scaler,
                                 model_ema, extra, tag="best")
            stats.update({f"test_{k}": v for k, v in test_stats.items()})
            if log_writer is not None:
                log_writer.update(head="perf", step=epoch,
                                  **{f"test_{k}": v for k, v in test_stats.items()})
            if model_ema is not None and args.model_ema_eval:
                ema_stats = score.evaluate(val_loader, model_ema.module, ema_device(model_ema),
                                           amp_dtype, header="Test (EMA):")
                report_skipped(val_loader, f"epoch {epoch} (eval, EMA)", device)
                if score.improved(ema_stats, "_ema") and args.output_dir and args.save_ckpt:
                    utils.save_model(args, epoch, model_without_ddp, optimizer,
                                     loss_scaler, model_ema, extra, tag="best-ema")
                stats.update({f"test_{k}_ema": v for k, v in ema_stats.items()})
                if log_writer is not None:
                    log_writer.update(head="perf", step=epoch,
                                      **{f"test_{k}_ema": v for k, v in ema_stats.items()})
        stats.update({"epoch": epoch, "n_parameters": n_parameters})
        if args.output_dir and utils.is_main_process():
            if log_writer is not None:
                log_writer.flush()
            utils.append_json_log(args.output_dir, stats)
        # Saved after the log line: a run killed in between repeats this epoch on resume (and
        # the log is trimmed to the resumed epoch) instead of resuming past an unlogged epoch.
        if args.output_dir and args.save_ckpt and ((epoch + 1) % args.save_ckpt_freq == 0
                                                   or epoch + 1 == args.epochs):
            utils.save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, model_ema,
                             extra)

    if log_writer is not None:
        log_writer.close()
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total}")
    return stats


def cli(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser("lknets", parents=[get_args_parser()])
    args = parser.parse_args(argv)

    def run() -> Dict[str, Any]:
        with utils.peer_failures_reported(args):
            return main(args)

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(cli())
