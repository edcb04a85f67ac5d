"""Bad input: one clear line on stderr, a non-zero exit, and nothing lost."""
import os
import shutil

import pytest
import torch

import main as lk_main
import utils

BASE = ["--model", "convnext_atto", "--device", "cpu", "--input_size", "32", "--batch_size", "16",
        "--num_workers", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
        "--train_subset", "64", "--eval_subset", "32", "--warmup_epochs", "0"]


def cli_error(argv, capsys):
    code = lk_main.cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_model_lists_close_names(capsys):
    msg = cli_error(BASE + ["--model", "convnext_tinyy"], capsys)
    assert "unknown model 'convnext_tinyy'" in msg
    assert "convnext_tiny" in msg and "Registered models:" in msg


def test_missing_data_path_is_named(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    msg = cli_error(BASE + ["--data_path", str(missing)], capsys)
    assert str(missing) in msg and "does not exist" in msg


def test_empty_image_folder_is_named(capsys, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    msg = cli_error(BASE + ["--data_path", str(tmp_path), "--data_set", "IMNET"], capsys)
    assert str(tmp_path / "train") in msg and "no images found" in msg


def test_fashion_mnist_folder_without_files(capsys, tmp_path):
    msg = cli_error(BASE + ["--data_set", "fashion_mnist", "--data_path", str(tmp_path)], capsys)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_class_count_mismatch(capsys):
    msg = cli_error(BASE + ["--nb_classes", "5"], capsys)
    assert "--nb_classes 5" in msg and "10 classes" in msg


@pytest.mark.parametrize("flags, expected", [
    (["--batch_size", "0"], "--batch_size must be > 0"),
    (["--layer_decay", "1.5"], "--layer_decay must be in (0, 1]"),
    (["--drop_path", "1.0"], "--drop_path must be in [0, 1)"),
    (["--with_small_kernel_merged", "true"], "use it with --eval true"),
    (["--deploy", "true"], "cannot be built with"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--lr", "-0.001"], "--lr must be a finite number >= 0, got -0.001"),
    (["--min_lr", "inf"], "--min_lr must be a finite number >= 0, got inf"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0, got -1"),
    (["--clip_grad", "0"], "--clip_grad must be a positive number"),
    (["--input_size", "16"], "--input_size 16 is too small for convnext_atto, whose feature "
                             "maps shrink below one pixel; the smallest size it takes is 32"),
    (["--input_size", "40", "--test_size", "24"], "--test_size 24 is too small"),
    (["--model", "SLaK_tiny", "--input_size", "8"], "the smallest size it takes is 32"),
    (["--opt", "adamx"], "--opt adamx is not usable"),
    (["--model", "SLaK_tiny", "--kernel_size", "51", "49", "47"], "kernel_size must be 5 ints"),
    (["--kernel_size", "51", "49", "47", "13", "5"],
     "--kernel_size is a flag of the slak (SLaK_tiny, SLaK_small, SLaK_base, ...) models; "
     "convnext_atto (family convnext) does not take it"),
    (["--model", "RepLKNet-31B", "--variant", "1d"],
     "--variant is a flag of the convnext (convnext_atto, convnext_tiny, convnext_small, ...) "
     "models; RepLKNet-31B (family replknet) does not take it"),
    (["--model", "unireplknet_a", "--Decom", "false"], "--Decom is a flag of the slak"),
    (["--variant", "1d"], "--variant 1d exists for convnext_tiny and convnext_base only"),
])
def test_invalid_flag_values(capsys, flags, expected):
    assert expected in cli_error(BASE + flags, capsys)


def test_opt_error_lists_timms_optimizers(capsys):
    msg = cli_error(BASE + ["--opt", "adamx"], capsys)
    assert "timm's optimizers are: " in msg and "adamw" in msg and "lamb" in msg and "sgd" in msg


def test_input_size_check_covers_models_that_need_the_cpu(capsys):
    # Oriented-1D convs read their angles, so these models are tried on the CPU, not on meta.
    msg = cli_error(BASE + ["--model", "convnext_tiny", "--variant", "1d", "--input_size", "16"],
                    capsys)
    assert "--input_size 16 is too small for convnext_tiny" in msg and "takes is 29" in msg
    model = lk_main.models.create_model("convnext_tiny", variant="1d").eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 29, 29)).shape == (1, 1000)
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, 28, 28))


@pytest.mark.parametrize("flag", ["--output_dir", "--log_dir"])
def test_an_impossible_output_folder_fails_before_training(flag, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    msg = cli_error(BASE + [flag, str(blocker / "out")], capsys)
    assert msg == f"error: {flag} {blocker / 'out'} is not a writable folder: Not a directory"


def test_invalid_boolean_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        lk_main.cli(BASE + ["--model_ema", "maybe"])
    assert exc.value.code == 2
    assert "expected a boolean" in capsys.readouterr().err


def test_unknown_compile_mode_lists_the_modes(capsys):
    with pytest.raises(SystemExit) as exc:
        lk_main.cli(BASE + ["--compile", "fast"])
    assert exc.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("yes", True),
                                         ("1", True), ("false", False), ("False", False),
                                         ("no", False), ("0", False)])
def test_str2bool_spellings(text, value):
    assert utils.str2bool(text) is value


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts")
    assert lk_main.cli(BASE + ["--epochs", "2", "--output_dir", str(out)]) == 0
    return out


def test_truncated_resume_names_the_file(capsys, two_checkpoints, tmp_path):
    bad = tmp_path / "checkpoint-1.pth"
    data = (two_checkpoints / "checkpoint-1.pth").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    msg = cli_error(BASE + ["--eval", "true", "--resume", str(bad)], capsys)
    assert str(bad) in msg and "cannot read checkpoint" in msg


def test_auto_resume_falls_back_past_a_truncated_checkpoint(capsys, two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoint-1.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert lk_main.cli(BASE + ["--epochs", "2", "--output_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"WARNING: skipping {newest} for auto-resume: cannot read checkpoint" in text
    assert "Resume checkpoint " + str(out / "checkpoint-0.pth") in text
    # Epoch 1 was trained again and its checkpoint rewritten whole.
    ckpt = torch.load(newest, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1


def test_resume_with_wrong_architecture_lists_keys(capsys, two_checkpoints):
    msg = cli_error(BASE + ["--model", "convnext_tiny", "--eval", "true", "--resume",
                            str(two_checkpoints / "checkpoint-1.pth")], capsys)
    assert "does not fit model convnext_tiny" in msg
    assert "shape mismatches" in msg and "downsample_layers.0.0.weight" in msg
    # convnext_tiny has a third block in stage 0 that convnext_atto lacks.
    assert "54 missing: stages.0.2." in msg


def test_missing_resume_file(capsys, tmp_path):
    path = tmp_path / "nope.pth"
    msg = cli_error(BASE + ["--eval", "true", "--resume", str(path)], capsys)
    assert msg == f"error: checkpoint file not found: {path}"


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-0.pth"
    utils.atomic_save({"model": {"w": torch.ones(2)}}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(utils.UserError, match=f"cannot write {path}: disk full; nothing was "
                                              "replaced"):
        utils.atomic_save({"model": {"w": torch.zeros(2)}}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["model"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["checkpoint-0.pth"]


def test_non_finite_loss_stops_with_the_step(capsys, monkeypatch):
    import engine

    class NanLoss(torch.nn.Module):
        def forward(self, output, target):
            return output.sum() * float("nan")

    model = lk_main.models.create_model("convnext_atto", num_classes=10)
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))] * 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(utils.UserError, match=r"loss is nan at epoch 4, iteration 0"):
        engine.train_one_epoch(model, NanLoss(), data, optimizer, torch.device("cpu"), 4,
                               utils.LossScaler(False, "cpu"), num_training_steps_per_epoch=3)


def test_a_requeue_signal_during_a_checkpoint_write_waits_for_the_file(tmp_path):
    """SLURM/submitit send SIGUSR2 to requeue; it must not cut a checkpoint write in half."""
    import signal

    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    real_save = torch.save

    def save_while_signalled(obj, f):
        os.kill(os.getpid(), signal.SIGUSR2)
        assert received == []  # held while writing
        real_save(obj, f)

    try:
        torch.save = save_while_signalled
        utils.atomic_save({"w": torch.ones(3)}, str(tmp_path / "checkpoint-0.pth"))
    finally:
        torch.save = real_save
        signal.signal(signal.SIGUSR2, previous)
    assert received == [signal.SIGUSR2]  # delivered once the file was complete
    assert torch.equal(torch.load(tmp_path / "checkpoint-0.pth")["w"], torch.ones(3))


def test_only_the_newest_save_ckpt_num_checkpoints_are_kept(tmp_path):
    assert lk_main.cli(BASE + ["--epochs", "4", "--save_ckpt_num", "2", "--disable_eval", "true",
                               "--output_dir", str(tmp_path)]) == 0
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pth")) == [
        "checkpoint-2.pth", "checkpoint-3.pth"]
