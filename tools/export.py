"""Export the deploy (re-parameterized) form of a model to ONNX or torch.export (.pt2).

    python tools/export.py --model unireplknet_b --checkpoint unireplknet_b_in1k_224.pth \
        --format onnx --input_size 224 --output unireplknet_b.onnx
    python tools/export.py --model SLaK_tiny --kernel_size 51 49 47 13 5 --width_factor 1.3 \
        --Decom true --checkpoint slak_tiny.pth --format torch_export --input_size 224

The model flags are main.py's (SLaK's ``--kernel_size/--Decom/--width_factor``, oriented-1D's
``--variant``). The checkpoint may hold the training or the deploy form (whichever fits is used;
one of ours or an upstream release: {'model': ...}, {'model_ema': ...}, {'state_dict': ...} or a
raw state dict); without ``--checkpoint`` the model keeps its random initial weights.

What is written: the eval model, re-parameterized (``models.reparameterize_model``: RepLKNet's
small kernels, SLaK's decomposed strips and UniRepLKNet's dilated branches merged into one
kernel each), with every remaining BatchNorm folded into the conv before it, the unpadded conv
after it, or the linear layer after a global pool, so the graph holds no BatchNorm. The batch
axis is dynamic (input ``input``, output ``logits``); height and width are fixed at
``--input_size``. ONNX uses opset 18 by default (the lowest torch's exporter writes without a
version conversion; every runtime from onnxruntime 1.14 on reads it).

The file is checked before it is moved into place: on random input at batch sizes 2, 1 and 3
(the example was traced at 2, so 1 and 3 prove the batch axis dynamic), the exported model
(ONNX through onnxruntime, .pt2 through torch.export.load) must match the PyTorch eval model as
loaded, before re-parameterization, within ``--tolerance`` (max abs error / max |output|). A
file that fails it is not written, and the tool exits 2 with one line.

What runs where: export and checks run on the CPU in float32, with large-kernel depthwise convs
on torch's implementation (``kernels.plan.using(impl='torch')``). lknets' CUDA depthwise kernel is a torch
custom op that the models call only for CUDA inputs, so it never enters an exported graph: ONNX
gets plain ``Conv`` nodes (group = channels) and the .pt2 plain ``aten.conv2d``, which any
runtime and device run.

ONNX needs the optional packages of requirements-export.txt (onnx, onnxscript for the export,
onnxruntime for the check): ``pip install -r requirements-export.txt``. Without onnxruntime the
file is still exported and checked for BatchNorm nodes and a dynamic batch axis, and the tool
says the numerical check was skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402
import utils  # noqa: E402
from kernels.plan import using  # noqa: E402
from models.layers import DepthwiseConv2d  # noqa: E402
from utils import UserError  # noqa: E402

FORMATS = ("onnx", "torch_export")
SUFFIXES = {"onnx": ".onnx", "torch_export": ".pt2"}
# The example batch is traced; the other sizes must run through the same graph. A batch of 1
# catches an export that specialized the batch dimension (torch.export treats 0 and 1 apart).
EXAMPLE_BATCH = 2
CHECK_BATCHES = (EXAMPLE_BATCH, 1, 3)
DEFAULT_OPSET = 18
DEFAULT_TOLERANCE = 1e-4
INSTALL_HINT = "pip install -r requirements-export.txt"

BatchNorm = nn.modules.batchnorm._BatchNorm
# Convs that compute conv2d(x, weight, bias), into which a per-channel affine map folds. Matched
# by exact type: a subclass may compute more (OrientedConv1d's residual tap is not in its weight).
_PLAIN_CONVS = (nn.Conv2d, DepthwiseConv2d)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    max_abs / max_rel: largest absolute error of the exported model against the PyTorch eval
    model over all checked batches, and that error divided by the largest |reference output|;
    None when the numerical check was skipped (``skipped`` says why).
    """

    path: str
    format: str
    input_size: int
    opset: Optional[int]
    nodes: int
    batchnorm_nodes: int
    folded_batchnorms: int
    max_abs: Optional[float]
    max_rel: Optional[float]
    tolerance: float
    skipped: str = ""

    def summary(self) -> str:
        fmt = f"onnx opset {self.opset}" if self.format == "onnx" else self.format
        if self.max_abs is None:
            check = f"numerical check skipped: {self.skipped}"
        else:
            batches = ", ".join(map(str, CHECK_BATCHES))
            check = (f"vs the PyTorch eval model: max abs error {self.max_abs:.2e}, max rel error "
                     f"{self.max_rel:.2e} (batches {batches}; tolerance {self.tolerance:.0e})")
        return (f"wrote {self.path} ({fmt}, input Nx3x{self.input_size}x{self.input_size}, "
                f"dynamic batch); {check}; {self.nodes} nodes, {self.batchnorm_nodes} BatchNorm "
                f"({self.folded_batchnorms} folded)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registered model name, e.g. RepLKNet-31B")
    parser.add_argument("--checkpoint", default=None,
                        help="weights in training or deploy form; default: random weights")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx (a .onnx file) or torch_export (a .pt2 for torch.export.load)")
    parser.add_argument("--input_size", type=int, required=True,
                        help="height and width of the exported input (fixed in the graph)")
    parser.add_argument("--output", default=None,
                        help="file to write; default: {model}_deploy_{input_size}px.onnx|.pt2")
    parser.add_argument("--nb_classes", type=int, default=None,
                        help="head size; default: the checkpoint's head.weight, else 1000")
    parser.add_argument("--model_key", default="model|model_ema|state_dict|module",
                        help="'|'-separated keys to look for the weights under, first found wins")
    parser.add_argument("--trust_checkpoint", type=utils.str2bool, default=False,
                        help="unpickle --checkpoint without the weights-only guard (it can run "
                             "code: only for files you trust)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, at least 18 (default {DEFAULT_OPSET})")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest accepted max abs error / max |output| against the PyTorch "
                             f"eval model (default {DEFAULT_TOLERANCE:.0e})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights (without --checkpoint) and check inputs")
    models.add_family_args(parser)
    return parser


def load_model(model_name: str, checkpoint: Optional[str] = None,
               nb_classes: Optional[int] = None,
               model_key: str = "model|model_ema|state_dict|module", trust: bool = False,
               **model_kwargs: Any) -> Tuple[nn.Module, str]:
    """Build ``model_name`` (with ``model_kwargs``, e.g. SLaK's kernel_size/Decom) in the form
    ``checkpoint`` fits, load it, and return ``(eval model, what was loaded)``: 'training form',
    'deploy form' or 'random weights'."""
    try:
        models.get_family(model_name)
    except ValueError as err:
        raise UserError(str(err)) from err
    state = None
    if checkpoint is not None:
        state = utils.extract_state_dict(utils.load_checkpoint_file(checkpoint, trust), model_key)
    if nb_classes is None:
        head = state.get("head.weight") if state is not None else None
        nb_classes = head.shape[0] if head is not None else 1000
    try:
        model = models.create_model(model_name, num_classes=nb_classes, **model_kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from err
    if state is None:
        return model.eval(), "random weights"
    mismatch = utils.state_dict_mismatch(model, state)
    if not any(mismatch):
        model.load_state_dict(state)
        return model.eval(), "training form"
    reasons = [f"training form: {utils.describe_mismatch(*mismatch)}"]
    try:
        deploy = models.create_model(model_name, num_classes=nb_classes, deploy=True,
                                     **model_kwargs)
    except TypeError:  # the family has no deploy form (ConvNeXt, oriented 1D)
        deploy = None
    if deploy is not None:
        deploy_mismatch = utils.state_dict_mismatch(deploy, state)
        if not any(deploy_mismatch):
            deploy.load_state_dict(state)
            return deploy.eval(), "deploy form"
        reasons.append(f"deploy form: {utils.describe_mismatch(*deploy_mismatch)}")
    raise UserError(f"{checkpoint} fits neither form of model {model_name}: "
                    + "; ".join(reasons))


class _LayerTracer(torch.fx.Tracer):
    """Records every conv (DepthwiseConv2d and OrientedConv1d included), linear layer and
    BatchNorm as one call_module node: the fold needs to see which module feeds which, not how
    a conv dispatches."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return (isinstance(module, (nn.Conv2d, nn.Linear, BatchNorm))
                or super().is_leaf_module(module, qualname))


def _bn_affine(bn: BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift per channel, from the running statistics."""
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def _set_bias(layer: nn.Module, bias: torch.Tensor) -> None:
    # A bias-free conv or linear has 'bias' registered as None; assigning a Parameter fills it.
    layer.bias = nn.Parameter(bias.to(layer.weight.dtype))


def _fold_into_output(conv: nn.Conv2d, bn: BatchNorm) -> None:
    """conv -> bn becomes one conv: every output channel scaled and shifted."""
    scale, shift = _bn_affine(bn)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(shift)
    conv.weight.data = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
    _set_bias(conv, bias * scale + shift)


def _fold_into_input(layer: nn.Module, bn: BatchNorm) -> None:
    """bn -> layer becomes one layer: its weights see scaled inputs, its bias the shifts.

    Exact only without padding (a padded border would see zeros, not the shift), which the
    caller checks. For a grouped conv, output o of group g reads input channels of group g.
    """
    scale, shift = _bn_affine(bn)
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        in_scale, in_shift = scale[None, :], shift[None, :]
        taps = weight
    else:
        out_channels, per_group = weight.shape[:2]
        group = torch.arange(out_channels) // (out_channels // layer.groups)
        channel = group[:, None] * per_group + torch.arange(per_group)[None, :]
        in_scale, in_shift = scale[channel], shift[channel]
        taps = weight.sum(dim=(2, 3))
    bias = layer.bias.detach() if layer.bias is not None else weight.new_zeros(weight.shape[0])
    _set_bias(layer, bias + (taps * in_shift).sum(dim=1))
    layer.weight.data = weight * in_scale.reshape(*in_scale.shape, *[1] * (weight.dim() - 2))


def _is_global_pool(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """A per-channel spatial mean: it commutes with a per-channel affine map (a max does not)."""
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
    if (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, (list, tuple)) and sorted(d % 4 for d in dims) == [2, 3]
    return False


def _keeps_pooled_channels(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """After a global pool: flatten(x, 1), or a module that is the identity in eval mode
    (the head's dropout); channel c stays feature c."""
    if node.op == "call_module":
        module = modules[node.target]
        return (isinstance(module, (nn.Identity, nn.Dropout))
                or (isinstance(module, nn.Flatten) and module.start_dim == 1))
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    return False


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fold_target(bn_node: torch.fx.Node, modules: Dict[str, nn.Module],
                 calls: Counter) -> Optional[Tuple[str, str]]:
    """Where the BatchNorm at ``bn_node`` folds: ('output' or 'input', layer name) or None."""

    def sole_call(node: Optional[torch.fx.Node], kinds: Tuple[type, ...]) -> bool:
        return (node is not None and node.op == "call_module"
                and type(modules[node.target]) in kinds and calls[node.target] == 1)

    bn = modules[bn_node.target]
    source = bn_node.args[0]
    if (isinstance(source, torch.fx.Node) and sole_call(source, _PLAIN_CONVS)
            and len(source.users) == 1):
        return "output", source.target
    user = _only_user(bn_node)
    if sole_call(user, _PLAIN_CONVS):
        conv = modules[user.target]
        if not isinstance(conv.padding, str) and not any(conv.padding):
            return "input", user.target
        return None
    if user is not None and _is_global_pool(user, modules):
        user = _only_user(user)
        while user is not None and _keeps_pooled_channels(user, modules):
            user = _only_user(user)
        if sole_call(user, (nn.Linear,)) and modules[user.target].in_features == bn.num_features:
            return "input", user.target
    return None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm of ``model`` (in place) into a neighbouring layer and
    replace it with nn.Identity; returns how many were folded.

    A BatchNorm folds into the conv that feeds it alone, else into the unpadded conv it alone
    feeds (RepLKNet's pre-norms before 1x1 convs), else into the linear layer after a global
    average pool (RepLKNet's final norm; dropout and flatten may sit between). The data flow comes from a torch.fx trace; a layer
    called more than once is never changed. BatchNorms that fit none of these stay.
    """
    if not any(isinstance(m, BatchNorm) for m in model.modules()):
        return 0
    graph = _LayerTracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BatchNorm):
            continue
        bn = modules[node.target]
        if calls[node.target] != 1 or bn.running_mean is None:  # batch statistics: no fold
            continue
        target = _fold_target(node, modules, calls)
        if target is None:
            continue
        side, layer_name = target
        if side == "output":
            _fold_into_output(modules[layer_name], bn)
        else:
            _fold_into_input(modules[layer_name], bn)
        _set_submodule(model, node.target, nn.Identity())
        folded += 1
    return folded


def deploy_form(model: nn.Module) -> Tuple[nn.Module, int]:
    """A re-parameterized copy of the eval ``model`` with its BatchNorms folded, and how many
    BatchNorms were folded. UserError if one cannot be folded."""
    deploy = models.reparameterize_model(copy.deepcopy(model).eval())
    folded = fold_batchnorms(deploy)
    left = [name for name, m in deploy.named_modules() if isinstance(m, BatchNorm)]
    if left:
        raise UserError(f"cannot fold {len(left)} BatchNorm(s) of {type(model).__name__} into a "
                        f"neighbouring conv or linear layer ({', '.join(left[:5])}); the "
                        "exported graph would keep them")
    return deploy, folded


@contextlib.contextmanager
def _staged(output: str) -> Iterator[str]:
    """A path in a fresh folder next to ``output``; its files replace those in output's folder
    only when the block succeeds (an exporter may add an external-data file beside it)."""
    directory = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(directory, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".export-", dir=directory)
    except OSError as err:
        raise UserError(f"cannot write {output}: {err.strerror or err}") from err
    try:
        yield os.path.join(stage, os.path.basename(output))
        try:
            for name in os.listdir(stage):
                os.replace(os.path.join(stage, name), os.path.join(directory, name))
        except OSError as err:  # e.g. --output names a folder
            raise UserError(f"cannot write {output}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _errors(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]
            ) -> Tuple[float, float]:
    max_abs = max((o.double() - r.double()).abs().max().item()
                  for o, r in zip(outputs, references))
    scale = max(r.double().abs().max().item() for r in references)
    return max_abs, max_abs / scale if scale > 0 else max_abs


def _check_tolerance(what: str, errors: Tuple[float, float], tolerance: float) -> None:
    if not errors[1] <= tolerance:  # NaN fails too
        raise UserError(f"{what} differs from the PyTorch eval model: max abs error "
                        f"{errors[0]:.2e}, max rel error {errors[1]:.2e} > tolerance "
                        f"{tolerance:.0e}; nothing was written")


def _export_onnx(deploy: nn.Module, example: torch.Tensor, path: str, opset: int,
                 inputs: Sequence[torch.Tensor]
                 ) -> Tuple[int, int, Optional[List[torch.Tensor]], str]:
    """Write ``path``; (nodes, BatchNormalization nodes, outputs on ``inputs`` or None, why the
    run was skipped)."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(deploy, (example,), None, input_names=["input"],
                                output_names=["logits"], dynamic_shapes=({0: batch},),
                                opset_version=opset, dynamo=True, verbose=False)
    program.save(path)
    graph = onnx.load(path, load_external_data=False)
    nodes = list(graph.graph.node) + [n for f in graph.functions for n in f.node]
    batchnorms = sum(n.op_type == "BatchNormalization" for n in nodes)
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise UserError(f"the ONNX graph's batch axis is fixed at {batch_dim.dim_value}, not "
                        "dynamic; nothing was written")
    if importlib.util.find_spec("onnxruntime") is None:
        return len(nodes), batchnorms, None, f"onnxruntime is not installed ({INSTALL_HINT})"
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
               for x in inputs]
    return len(nodes), batchnorms, outputs, ""


def _export_program(deploy: nn.Module, example: torch.Tensor, path: str,
                    inputs: Sequence[torch.Tensor]) -> Tuple[int, int, List[torch.Tensor]]:
    """Write ``path`` with torch.export.save; (nodes, batch-norm nodes, outputs of the program
    loaded back on ``inputs``)."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(deploy, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    ops = [n for n in loaded.graph.nodes if n.op == "call_function"]
    batchnorms = sum("batch_norm" in str(n.target) for n in ops)
    module = loaded.module()
    with torch.no_grad():
        outputs = [module(x) for x in inputs]
    return len(ops), batchnorms, outputs


def export_model(model: nn.Module, fmt: str, input_size: int, output: str,
                 opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                 seed: int = 0) -> ExportResult:
    """Export the deploy form of the eval ``model`` (moved to the CPU in float32, in place) to
    ``output`` and check it against ``model``; see the module docstring. UserError when the
    input size does not fit, a BatchNorm cannot be folded, or a check fails."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if input_size < 1:
        raise UserError(f"--input_size must be positive, got {input_size}")
    if fmt == "torch_export" and not output.endswith(".pt2"):
        raise UserError(f"--output {output}: a torch_export file must end in .pt2 "
                        "(torch.export.load expects it)")
    if fmt == "onnx":
        if opset < DEFAULT_OPSET:
            raise UserError(f"--opset {opset}: torch's ONNX exporter writes opset 18 and above")
        missing = [p for p in ("onnx", "onnxscript") if importlib.util.find_spec(p) is None]
        if missing:
            raise UserError(f"ONNX export needs {' and '.join(missing)}: {INSTALL_HINT}")
    model = model.to("cpu", torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(b, 3, input_size, input_size, generator=generator)
              for b in CHECK_BATCHES]
    with using(impl="torch"), torch.no_grad():
        try:
            references = [model(x) for x in inputs]
        except RuntimeError as err:
            raise UserError(f"input size {input_size} does not run through "
                            f"{type(model).__name__}: {str(err).splitlines()[0]}") from err
        deploy, folded = deploy_form(model)
        _check_tolerance("the re-parameterized, BatchNorm-folded model",
                         _errors([deploy(x) for x in inputs], references), tolerance)
    with using(impl="torch"), _staged(output) as path:
        if fmt == "onnx":
            nodes, batchnorms, outputs, skipped = _export_onnx(deploy, inputs[0], path, opset,
                                                               inputs)
        else:
            nodes, batchnorms, outputs = _export_program(deploy, inputs[0], path, inputs)
            skipped = ""
        if batchnorms:
            raise UserError(f"the exported graph still has {batchnorms} batch-norm node(s); "
                            "nothing was written")
        errors = (None, None)
        if outputs is not None:
            errors = _errors(outputs, references)
            _check_tolerance(f"the exported {fmt} model", errors, tolerance)
    return ExportResult(output, fmt, input_size, opset if fmt == "onnx" else None, nodes,
                        batchnorms, folded, errors[0], errors[1], tolerance, skipped)


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)

    def export() -> None:
        try:
            model_kwargs = models.family_kwargs(args.model, args)
        except ValueError as err:
            raise UserError(str(err)) from err
        if args.nb_classes is not None and args.nb_classes < 1:
            raise UserError(f"--nb_classes must be positive, got {args.nb_classes}")
        if not args.tolerance >= 0:
            raise UserError(f"--tolerance must be a number >= 0, got {args.tolerance}")
        torch.manual_seed(args.seed)
        model, loaded = load_model(args.model, args.checkpoint, args.nb_classes, args.model_key,
                                   args.trust_checkpoint, **model_kwargs)
        if args.checkpoint is None:
            print(f"note: no --checkpoint, exporting {args.model} with random weights "
                  f"(seed {args.seed})")
        else:
            print(f"loaded the {loaded} of {args.model} from {args.checkpoint}")
        output = args.output or f"{args.model}_deploy_{args.input_size}px{SUFFIXES[args.format]}"
        result = export_model(model, args.format, args.input_size, output, args.opset,
                              args.tolerance, args.seed)
        print(result.summary())

    return utils.exit_status(export)


if __name__ == "__main__":
    sys.exit(main())
