"""tools/export.py: deploy-form ONNX and torch.export files that compute what the eval model
computes, with no BatchNorm left and a dynamic batch axis; bad input stops with one line."""
import importlib.util
import re

import pytest
import torch
import torch.nn as nn

import models
from models.convnext_1d import ConvNeXt1D
from models.replknet import RepLKNet
from tools.export import ExportResult, deploy_form, export_model, fold_batchnorms, load_model, main
from utils import UserError

SIZE = 64
# A batch size the tool does not check itself (it runs 2, 1 and 3).
OTHER_BATCH = 5
TOLERANCE = 1e-4
SUMMARY = re.compile(r"max abs error (\S+), max rel error (\S+) .*; (\d+) nodes, (\d+) BatchNorm "
                     r"\((\d+) folded\)")

# name -> (model, family flags, constructor kwargs for the same model)
CASES = {
    "convnext": ("convnext_atto", [], {}),
    "unireplknet": ("unireplknet_a", [], {}),
    "slak": ("SLaK_tiny", ["--width_factor", "0.25", "--Decom", "true",
                           "--kernel_size", "13", "11", "9", "7", "3"],
             {"width_factor": 0.25, "Decom": True, "kernel_size": [13, 11, 9, 7, 3]}),
    "oriented_1d": ("convnext_tiny", ["--variant", "1d"], {"variant": "1d"}),
}


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm, layer scale and GRN non-trivial values, so re-parameterization and
    BatchNorm folding change the numbers (layer scales of 1e-6 would hide a wrong block)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0, 0.2, generator=gen)
                module.running_mean.normal_(0, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.0, generator=gen)
            elif name.endswith("beta"):
                param.normal_(0, 0.1, generator=gen)
    return model.eval()


def training_checkpoint(tmp_path, case):
    name, _, kwargs = CASES[case]
    torch.manual_seed(0)
    model = perturb(models.create_model(name, num_classes=10, **kwargs))
    path = tmp_path / f"{case}.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return model, path


def reference(model: nn.Module, batch: int = OTHER_BATCH):
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return x, model(x)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def parse_summary(text: str):
    match = SUMMARY.search(text)
    assert match, text
    max_abs, max_rel, nodes, batchnorms, folded = match.groups()
    return float(max_abs), float(max_rel), int(nodes), int(batchnorms), int(folded)


def check_onnx(path, model):
    """The file itself, read independently of the tool: no BatchNormalization, a symbolic batch
    axis, and onnxruntime's logits at a batch size the tool did not try."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(path))
    ops = [node.op_type for node in graph.graph.node]
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x, ref = reference(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert out.shape == ref.shape
    assert rel_error(out, ref) < TOLERANCE
    return graph


def check_program(path, model):
    program = torch.export.load(str(path))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets)
    assert any("conv2d" in t for t in targets)
    x, ref = reference(model)
    with torch.no_grad():
        out = program.module()(x)
    assert rel_error(out, ref) < TOLERANCE


def conv_attributes(graph):
    for node in graph.graph.node:
        if node.op_type == "Conv":
            yield {a.name: list(a.ints) for a in node.attribute}


def export_cli(case, fmt, tmp_path, capsys):
    model, ckpt = training_checkpoint(tmp_path, case)
    name, flags, _ = CASES[case]
    out = tmp_path / f"{case}.{'onnx' if fmt == 'onnx' else 'pt2'}"
    code = main(["--model", name, *flags, "--checkpoint", str(ckpt), "--format", fmt,
                 "--input_size", str(SIZE), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"loaded the training form of {name}" in captured.out
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {out} (") and f"Nx3x{SIZE}x{SIZE}" in summary
    max_abs, max_rel, nodes, batchnorms, folded = parse_summary(summary)
    assert max_rel < TOLERANCE and batchnorms == 0 and nodes > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export-")] == []
    return model, out, folded


@pytest.mark.parametrize("case,fmt", [
    ("convnext", "torch_export"),
    ("unireplknet", "onnx"),
    ("slak", "onnx"),
    pytest.param("convnext", "onnx", marks=pytest.mark.slow),
    pytest.param("unireplknet", "torch_export", marks=pytest.mark.slow),
    pytest.param("slak", "torch_export", marks=pytest.mark.slow),
    pytest.param("oriented_1d", "torch_export", marks=pytest.mark.slow),
])
def test_exported_deploy_model_computes_the_training_checkpoints_logits(case, fmt, tmp_path,
                                                                       capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    model, out, _ = export_cli(case, fmt, tmp_path, capsys)
    if fmt == "torch_export":
        check_program(out, model)
        return
    graph = check_onnx(out, model)
    convs = list(conv_attributes(graph))
    if case == "slak":  # LoRA strips (13x3, 3x13) and the 3x3 branch merged into square kernels
        assert all(c["kernel_shape"][0] == c["kernel_shape"][1] for c in convs)
        assert [13, 13] in [c["kernel_shape"] for c in convs]
    if case == "unireplknet":  # the dilated branches merged into the 13x13 kernel
        assert all(set(c.get("dilations", [1])) == {1} for c in convs)
        assert [13, 13] in [c["kernel_shape"] for c in convs]


def small_replknet() -> RepLKNet:
    """RepLKNet's classes at a test size: every block type, BN everywhere, 7x7 + 3x3 branches."""
    torch.manual_seed(0)
    return perturb(RepLKNet(large_kernel_sizes=(7, 7, 5, 5), layers=(1, 1, 1, 1),
                            channels=(8, 16, 24, 32), small_kernel=3, num_classes=10))


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_replknet_batchnorms_all_fold_through_the_python_api(fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    model = small_replknet()
    out = tmp_path / f"replknet.{'onnx' if fmt == 'onnx' else 'pt2'}"
    result = export_model(model, fmt, SIZE, str(out))
    assert isinstance(result, ExportResult) and result.path == str(out)
    assert result.max_rel is not None and result.max_rel < TOLERANCE
    # 4 stem + 4 x (3 per RepLK block + 3 per ConvFFN) + 3 x 2 transitions + the final norm;
    # the pre-norms fold into the 1x1 convs after them, the final norm into the head.
    assert result.folded_batchnorms == 35 and result.batchnorm_nodes == 0
    if fmt == "onnx":
        check_onnx(out, model)
    else:
        check_program(out, model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is untouched


@pytest.mark.slow
def test_oriented_1d_exports_to_onnx(tmp_path):
    """convnext_tiny_1d's ONNX export takes 130 s on 2 cores (100 s of it in onnxscript's
    optimizer, on the per-angle-group slices): the same classes at a small width instead
    (30 s; 1dpp's, 80 s)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = perturb(ConvNeXt1D("1d", depths=(1, 1, 2, 1), dims=(16, 24, 32, 40),
                               num_classes=10))
    out = tmp_path / "oriented.onnx"
    result = export_model(model, "onnx", SIZE, str(out))
    assert result.max_rel is not None and result.max_rel < TOLERANCE
    check_onnx(out, model)


def test_without_onnxruntime_the_file_is_written_and_the_check_skipped(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    out = tmp_path / "replknet.onnx"
    result = export_model(small_replknet(), "onnx", SIZE, str(out))
    assert out.exists() and result.max_abs is None and result.batchnorm_nodes == 0
    assert "numerical check skipped: onnxruntime is not installed (pip install -r " \
           "requirements-export.txt)" in result.summary()


@pytest.mark.slow
def test_replknet_31b_exports_through_the_cli(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "r31b.onnx"
    assert main(["--model", "RepLKNet-31B", "--format", "onnx", "--input_size", str(SIZE),
                 "--output", str(out), "--nb_classes", "10"]) == 0
    captured = capsys.readouterr().out
    assert "note: no --checkpoint, exporting RepLKNet-31B with random weights" in captured
    max_abs, max_rel, nodes, batchnorms, folded = parse_summary(captured)
    # 4 stem + 24 x 3 (RepLK blocks) + 24 x 3 (ConvFFNs) + 3 x 2 transitions + 1 final norm
    assert (batchnorms, folded) == (0, 155) and max_rel < TOLERANCE
    assert out.exists()


class FoldCases(nn.Module):
    """One BatchNorm per case: after a conv, before a grouped 1x1 conv, after a ReLU before a
    padded conv (cannot fold), before a mean + dropout + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1, groups=2)
        self.bn3 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.bn2(self.bn1(self.conv1(x))))
        x = self.conv3(self.bn3(torch.relu(x)))
        return self.head(self.drop(self.bn4(x).mean((-2, -1))))


def test_fold_batchnorms_is_exact_and_leaves_what_it_cannot_fold():
    model = perturb(FoldCases().double())
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorms(model) == 3
        assert rel_error(model(x), expected) < 1e-12
    kinds = {name: type(getattr(model, name)) for name in ("bn1", "bn2", "bn3", "bn4")}
    assert kinds == {"bn1": nn.Identity, "bn2": nn.Identity, "bn3": nn.BatchNorm2d,
                     "bn4": nn.Identity}
    with pytest.raises(UserError, match=r"cannot fold 1 BatchNorm\(s\) of FoldCases .*\(bn3\)"):
        deploy_form(perturb(FoldCases()))


def test_checkpoint_form_is_detected(tmp_path):
    model, ckpt = training_checkpoint(tmp_path, "unireplknet")
    deploy = models.reparameterize_model(model)
    deploy_ckpt = tmp_path / "deploy.pth"
    torch.save(deploy.state_dict(), deploy_ckpt)  # a raw state dict, as upstream's *_deploy.pth
    loaded, form = load_model("unireplknet_a", str(deploy_ckpt))
    assert form == "deploy form" and not loaded.training
    x, ref = reference(deploy, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert load_model("unireplknet_a", str(ckpt))[1] == "training form"


def test_a_wrong_deploy_form_is_caught_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    reparameterize = models.reparameterize_model

    def broken(model):
        reparameterize(model)
        with torch.no_grad():
            model.head.bias.add_(1.0)
        return model

    monkeypatch.setattr(models, "reparameterize_model", broken)
    out = tmp_path / "bad.pt2"
    assert main(["--model", "convnext_atto", "--format", "torch_export", "--input_size", "32",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the re-parameterized, BatchNorm-folded "
                                               "model differs from the PyTorch eval model")
    assert list(tmp_path.iterdir()) == []


def one_error_line(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


BASE = ["--format", "torch_export", "--input_size", "32"]


def test_unknown_model(capsys):
    msg = one_error_line(["--model", "unireplknet_zz", *BASE], capsys)
    assert "unknown model 'unireplknet_zz'" in msg and "unireplknet_a" in msg


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nowhere.pth"
    msg = one_error_line(["--model", "convnext_atto", "--checkpoint", str(missing), *BASE],
                         capsys)
    assert msg == f"error: checkpoint file not found: {missing}"


def test_checkpoint_that_fits_neither_form(tmp_path, capsys):
    _, ckpt = training_checkpoint(tmp_path, "convnext")
    msg = one_error_line(["--model", "unireplknet_a", "--checkpoint", str(ckpt), *BASE], capsys)
    assert f"{ckpt} fits neither form of model unireplknet_a: training form:" in msg
    assert "; deploy form: " in msg and "missing" in msg


def test_family_flag_of_another_family(capsys):
    msg = one_error_line(["--model", "convnext_atto", "--Decom", "true", *BASE], capsys)
    assert "--Decom is a flag of the slak" in msg and "convnext_atto" in msg


def test_input_too_small_and_wrong_suffix(tmp_path, capsys):
    msg = one_error_line(["--model", "convnext_atto", "--format", "torch_export",
                          "--input_size", "8", "--output", str(tmp_path / "a.pt2")], capsys)
    assert msg.startswith("error: input size 8 does not run through ConvNeXt")
    msg = one_error_line(["--model", "convnext_atto", *BASE, "--output", str(tmp_path / "a.pt")],
                         capsys)
    assert "must end in .pt2" in msg


def test_unsupported_format_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "convnext_atto", "--format", "tflite", "--input_size", "32"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "invalid choice: 'tflite'" in errors[0]
