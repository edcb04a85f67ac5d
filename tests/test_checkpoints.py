"""Checkpoints: loading never runs code, junk never costs good files, resuming never silently
restarts, and weights that do not fit say what to try."""
import argparse
import glob
import os
import shutil
import struct

import pytest
import torch

import main as lk_main
import models
import utils

BASE = ["--model", "convnext_atto", "--device", "cpu", "--input_size", "32", "--batch_size", "16",
        "--num_workers", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
        "--train_subset", "64", "--eval_subset", "32", "--warmup_epochs", "0"]


def cli_error(argv, capsys):
    code = lk_main.cli(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.out[-2000:] + captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, captured.err
    return lines[0]


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two epochs of convnext_atto: checkpoint-0/1, best, log and tensorboard scalars."""
    out = tmp_path_factory.mktemp("run")
    assert lk_main.cli(BASE + ["--epochs", "2", "--output_dir", str(out),
                               "--log_dir", str(out / "tb")]) == 0
    return out


@pytest.fixture()
def weights(run_dir):
    return torch.load(run_dir / "checkpoint-1.pth", map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- weights-only loads

def test_a_crafted_checkpoint_runs_nothing_and_names_the_type(tmp_path, weights, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": weights["model"], "payload": RunsCode(marker)}, evil)
    for flag in ("--resume", "--finetune"):
        msg = cli_error(BASE + ["--eval", "true", flag, str(evil)], capsys)
        assert f"refusing to load checkpoint {evil}" in msg
        assert "posix.system" in msg and "--trust_checkpoint true" in msg
    assert not marker.exists()
    # The explicit opt-in loads it the old way (and so runs its code).
    assert lk_main.cli(BASE + ["--eval", "true", "--resume", str(evil),
                               "--trust_checkpoint", "true"]) == 0
    assert marker.exists()


def test_auto_resume_and_tools_refuse_a_crafted_checkpoint(tmp_path, weights, capsys):
    from tools.convert_to_backbone_weights import main as convert_main
    from tools.reparameterize import main as reparameterize_main

    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    torch.save({**weights, "payload": RunsCode(marker)}, out / "checkpoint-1.pth")
    code = lk_main.cli(BASE + ["--epochs", "3", "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "none is readable (checkpoint-1.pth)" in captured.err
    assert "posix.system" in captured.out  # the warning that skipped it says why
    evil = str(out / "checkpoint-1.pth")
    assert reparameterize_main(["--model", "convnext_atto", "--src", evil,
                                "--dst", str(tmp_path / "d.pth")]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert convert_main(["--model", "convnext_tiny", "--variant", "1d", "--checkpoint", evil,
                         "--output_dir", str(tmp_path / "c")]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_url_checkpoints_are_loaded_weights_only(tmp_path, weights, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    served = {"good.pth": weights, "evil.pth": {"model": weights["model"],
                                                "payload": RunsCode(tmp_path / "pwned")}}

    def download(url, dst, hash_prefix=None, progress=True):
        torch.save(served[os.path.basename(url)], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    ckpt = utils.load_checkpoint_file("https://example.invalid/ckpts/good.pth")
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], argparse.Namespace)
    assert os.path.isfile(hub / "checkpoints" / "good.pth")
    with pytest.raises(utils.UserError, match="posix.system"):
        utils.load_checkpoint_file("https://example.invalid/ckpts/evil.pth")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("layout", ["raw", "model", "model_ema", "state_dict", "module",
                                    "full_training"])
def test_every_upstream_layout_loads_weights_only(layout, weights, tmp_path):
    state = weights["model"]
    files = {
        "raw": {f"module.{k}": v for k, v in state.items()},
        "model": {"model": state},
        "model_ema": {"model_ema": state},
        "state_dict": {"state_dict": state},
        "module": {"module": state},
        # ConvNeXt-style training checkpoint: Namespace, optimizer, scaler, epoch, EMA.
        "full_training": {"model": state, "optimizer": weights["optimizer"], "epoch": 7,
                          "scaler": {}, "args": argparse.Namespace(model="x", lr=4e-3,
                                                                   opt_betas=None),
                          "model_ema": state},
    }
    path = tmp_path / "ckpt.pth"
    torch.save(files[layout], path)
    ckpt = utils.load_checkpoint_file(str(path))
    loaded = utils.extract_state_dict(ckpt, "model|model_ema|state_dict|module")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# --------------------------------------------------------------------------- junk and pruning

def test_a_junk_checkpoint_never_costs_good_ones(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    junk = out / "checkpoint-99.pth"
    junk.write_bytes(os.urandom(4096))
    # Only unreadable checkpoints: no silent restart, but what to do.
    msg = cli_error(BASE + ["--epochs", "2", "--save_ckpt_num", "1", "--output_dir", str(out)],
                    capsys)
    assert "none is readable (checkpoint-99.pth)" in msg and "--auto_resume false" in msg
    assert lk_main.cli(BASE + ["--epochs", "2", "--save_ckpt_num", "1", "--auto_resume", "false",
                               "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == [
        "checkpoint-1.pth", "checkpoint-99.pth", "checkpoint-best.pth"]
    assert junk.stat().st_size == 4096
    # The next start skips the junk and resumes from the good checkpoint.
    capsys.readouterr()
    assert lk_main.cli(BASE + ["--epochs", "3", "--save_ckpt_num", "1",
                               "--output_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"WARNING: skipping {junk} for auto-resume" in text
    assert f"Resume checkpoint {out / 'checkpoint-1.pth'}" in text
    assert "Start training for 3 epochs (from epoch 2)" in text
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == [
        "checkpoint-2.pth", "checkpoint-99.pth", "checkpoint-best.pth"]


def test_pruning_counts_only_this_runs_readable_checkpoints(tmp_path, weights):
    out = tmp_path / "out"
    out.mkdir()
    foreign = {**weights, "epoch": 0, "args": argparse.Namespace(model="convnext_tiny")}
    torch.save(foreign, out / "checkpoint-0.pth")  # another model's run
    (out / "checkpoint-1.pth").write_bytes(b"not a checkpoint")  # junk, not the newest
    args = lk_main.get_args_parser().parse_args(BASE + ["--output_dir", str(out),
                                                        "--save_ckpt_num", "2"])
    model = models.create_model("convnext_atto", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = utils.LossScaler(False, "cpu")
    for epoch in (2, 3, 4):
        utils.save_model(args, epoch, model, optimizer, scaler)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-3.pth", "checkpoint-4.pth"]
    assert utils.is_run_checkpoint(str(out / "checkpoint-4.pth"), 4, "convnext_atto")
    assert not utils.is_run_checkpoint(str(out / "checkpoint-4.pth"), 3, "convnext_atto")
    assert not utils.is_run_checkpoint(str(out / "checkpoint-0.pth"), 0, "convnext_atto")
    assert not utils.is_run_checkpoint(str(out / "checkpoint-1.pth"), 1, "convnext_atto")


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = out / "checkpoint-3.pth.tmp.4194999"  # above the default pid_max: no such process
    alive = out / f"checkpoint-4.pth.tmp.{os.getppid()}"
    for path in (dead, alive):
        path.write_bytes(b"partial")
    assert lk_main.cli(BASE + ["--epochs", "1", "--output_dir", str(out)]) == 0
    assert f"Removed {dead}, left by a writer that was killed" in capsys.readouterr().out
    assert not dead.exists() and alive.exists()


def test_a_full_disk_during_a_save_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "out"
    assert lk_main.cli(BASE + ["--epochs", "1", "--output_dir", str(out)]) == 0
    before = (out / "checkpoint-0.pth").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    msg = cli_error(BASE + ["--epochs", "2", "--output_dir", str(out), "--disable_eval", "true"],
                    capsys)
    assert msg.startswith(f"error: cannot write {out / 'checkpoint-1.pth'}: No space left")
    assert f"the files already in {out} are intact" in msg
    assert (out / "checkpoint-0.pth").read_bytes() == before
    assert not glob.glob(str(out / "*.tmp.*"))


# --------------------------------------------------------------------------- resuming

def test_resume_from_checkpoint_best_continues_after_its_epoch(run_dir, tmp_path, capsys):
    best = torch.load(run_dir / "checkpoint-best.pth", map_location="cpu", weights_only=False)
    assert isinstance(best["epoch"], int)
    out = tmp_path / "out"
    assert lk_main.cli(BASE + ["--epochs", str(best["epoch"] + 2), "--output_dir", str(out),
                               "--resume", str(run_dir / "checkpoint-best.pth")]) == 0
    text = capsys.readouterr().out
    assert f"from epoch {best['epoch'] + 1})" in text
    assert [p.name for p in out.glob("checkpoint-*.pth") if "best" not in p.name] == [
        f"checkpoint-{best['epoch'] + 1}.pth"]


def test_upstream_best_checkpoint_without_an_epoch_number(run_dir, tmp_path, capsys):
    ckpt = torch.load(run_dir / "checkpoint-best.pth", map_location="cpu", weights_only=False)
    ckpt["epoch"] = "best"  # as ConvNeXt/RepLKNet/SLaK's main.py save it
    path = tmp_path / "checkpoint-best.pth"
    torch.save(ckpt, path)
    msg = cli_error(BASE + ["--epochs", "3", "--resume", str(path)], capsys)
    assert "records its epoch as 'best'" in msg and f"--finetune {path}" in msg
    assert lk_main.cli(BASE + ["--eval", "true", "--resume", str(path)]) == 0


def test_a_release_without_an_epoch_resumes_with_a_warning(run_dir, tmp_path, capsys):
    raw = tmp_path / "release.pth"
    torch.save({"model": torch.load(run_dir / "checkpoint-1.pth", map_location="cpu",
                                    weights_only=False)["model"]}, raw)
    assert lk_main.cli(BASE + ["--epochs", "1", "--resume", str(raw)]) == 0
    text = capsys.readouterr().out
    assert f"WARNING: {raw} records no epoch" in text and "from epoch 0)" in text


def test_eval_needs_weights_unless_random_init_is_asked_for(capsys):
    msg = cli_error(BASE + ["--eval", "true"], capsys)
    assert "no weights to evaluate" in msg and "--eval_random_init true" in msg
    assert lk_main.cli(BASE + ["--eval", "true", "--eval_random_init", "true"]) == 0


def test_finetune_whose_keys_miss_names_both_sides_and_the_prefix(weights, tmp_path, capsys):
    path = tmp_path / "detector.pth"
    prefixed = {f"backbone.{k}": v for k, v in weights["model"].items()}
    torch.save({"model": prefixed, "ema_state_dict": weights["model"]}, path)
    msg = cli_error(BASE + ["--epochs", "1", "--finetune", str(path)], capsys)
    assert "fits only 0 of the" in msg
    assert "model keys: downsample_layers.0.0.weight" in msg
    assert "checkpoint keys: backbone.downsample_layers.0.0.weight" in msg
    assert "try --model_prefix backbone. or --model_key ema_state_dict" in msg
    assert lk_main.cli(BASE + ["--epochs", "1", "--finetune", str(path),
                               "--model_prefix", "backbone."]) == 0
    torch.save({"state_dict": prefixed}, path)
    msg = cli_error(BASE + ["--epochs", "1", "--finetune", str(path)], capsys)
    assert "weights are under ['state_dict']: pass --model_key state_dict" in msg
    assert lk_main.cli(BASE + ["--epochs", "1", "--finetune", str(path), "--model_key",
                               "state_dict", "--model_prefix", "backbone."]) == 0


def test_tensorboard_after_resume_purges_the_killed_partial_epoch(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    os.remove(out / "checkpoint-1.pth")  # killed during epoch 1: its scalars are stale
    assert lk_main.cli(BASE + ["--epochs", "2", "--output_dir", str(out),
                               "--log_dir", str(out / "tb")]) == 0
    newest = max(glob.glob(str(out / "tb" / "events.out.tfevents*")), key=os.path.getmtime)
    steps_per_epoch = 64 // 16
    assert _purge_steps(newest) == [steps_per_epoch]


def _purge_steps(event_file):
    """Steps of the 'session start' events (TensorBoard's purge markers) in an event file."""
    from tensorboardX.proto import event_pb2

    steps = []
    with open(event_file, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event.FromString(f.read(length))
            f.read(4)
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                steps.append(event.step)
    return steps
