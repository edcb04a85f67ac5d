"""Audio, time series, video and point clouds through main.py, and the video / point adapters.

Each --data_set trains a few steps on the CPU through main.py (with the default recipe's flags
where they apply) and writes its metrics and checkpoints; the adapters are checked element by
element against independent index computations.
"""
import json
import math
import os
import wave

import numpy as np
import pytest
import torch

import main as lk_main
import modalities
from models.pointcloud import PointRenderer, view_rotations
from models.video import clip_to_image, create_video_classifier

BASE = ["--model", "unireplknet_a", "--device", "cpu", "--batch_size", "8", "--num_workers", "0",
        "--epochs", "1", "--warmup_epochs", "0", "--lr", "1e-3", "--train_subset", "16",
        "--eval_subset", "8"]


def run(argv):
    return lk_main.main(lk_main.get_args_parser().parse_args(argv))


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def write_tone_folder(root, rate=16000):
    """root/{train,val}/<class>/*.wav: three classes of 0.5 s tones."""
    for split, count in (("train", 6), ("val", 3)):
        for name, freq in (("high", 2500.0), ("low", 300.0), ("mid", 900.0)):
            os.makedirs(os.path.join(root, split, name))
            for k in range(count):
                t = np.arange(rate // 2) / rate
                wave_ = 0.3 * np.sin(2 * np.pi * freq * (1 + 0.03 * k) * t)
                tone = (wave_ * 32767).astype(np.int16)
                with wave.open(os.path.join(root, split, name, f"{k}.wav"), "wb") as f:
                    f.setnchannels(1)
                    f.setsampwidth(2)
                    f.setframerate(rate)
                    f.writeframes(tone.tobytes())


needs_extras = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(p) is None for p in ("statsmodels", "sktime")),
    reason="needs requirements-modalities.txt (statsmodels, sktime)")


@pytest.mark.parametrize("data_set,extra", [
    ("synthetic_video", ["--input_size", "16"]),           # mixup and cutmix on clips
    ("synthetic_points", ["--input_size", "32"]),
    pytest.param("gunpoint", [], marks=needs_extras),
    pytest.param("basicmotions", [], marks=needs_extras),
    pytest.param("japanese_vowels", ["--model_ema", "true", "--model_ema_eval", "true"],
                 marks=needs_extras),
])
def test_classification_data_sets_train_through_main(data_set, extra, tmp_path):
    stats = run(BASE + ["--data_set", data_set, "--output_dir", str(tmp_path)] + extra)
    log = read_log(tmp_path)
    assert len(log) == 1 and 0 <= log[0]["test_acc1"] <= 100 and math.isfinite(log[0]["train_loss"])
    assert stats["test_acc1"] == log[0]["test_acc1"]
    assert os.path.isfile(tmp_path / "checkpoint-best.pth")
    if "--model_ema" in extra:
        assert "test_acc1_ema" in log[0]


def test_speech_commands_folder_trains_through_main(tmp_path):
    write_tone_folder(tmp_path / "sc")
    run(BASE + ["--data_set", "speech_commands", "--data_path", str(tmp_path / "sc"),
                "--input_size", "32", "--output_dir", str(tmp_path / "out")])
    log = read_log(tmp_path / "out")
    assert log[0]["test_acc1"] >= 0 and math.isfinite(log[0]["train_loss"])


@needs_extras
def test_forecasting_reports_mse_mae_and_the_naive_baseline(tmp_path, capsys):
    argv = BASE + ["--data_set", "co2", "--input_size", "16", "--pred_len", "4",
                   "--output_dir", str(tmp_path), "--epochs", "2"]
    stats = run(argv)
    out = capsys.readouterr().out
    assert "criterion = MSELoss()" in out and "mixup off" not in out.lower()
    assert "--mixup and --cutmix off: not applicable to --data_set co2" in out
    log = read_log(tmp_path)
    for row in log:
        assert {"test_mse", "test_mae", "test_naive_mse", "test_naive_mae"} <= set(row)
        assert row["test_loss"] == row["test_mse"] and "test_acc1" not in row
    # The naive baseline does not depend on the model: the same windows give the same numbers.
    assert log[0]["test_naive_mse"] == log[1]["test_naive_mse"] > 0
    assert stats["test_mse"] == log[1]["test_mse"]
    best = min(row["test_mse"] for row in log)
    assert f"Min MSE: {best:.5f}" in out
    # The best checkpoint evaluates to the best logged MSE.
    evaluated = run(argv + ["--eval", "true", "--resume", str(tmp_path / "checkpoint-best.pth")])
    assert evaluated["mse"] == pytest.approx(best, rel=1e-6)
    assert "MSE of the network on the test windows" in capsys.readouterr().out


@needs_extras
def test_multivariate_forecasting_trains_through_main(tmp_path):
    run(BASE + ["--data_set", "macrodata", "--input_size", "16", "--pred_len", "4",
                "--output_dir", str(tmp_path)])
    row = read_log(tmp_path)[0]
    assert math.isfinite(row["test_mse"]) and row["test_naive_mse"] > 0


def test_score_ranks_forecasts_by_lower_mse():
    args = lk_main.get_args_parser().parse_args(["--data_set", "co2"])
    score = lk_main.Score(args)
    score.restore([{"test_mse": 0.5}, {"test_mse": 0.2}, {"test_acc1": 3.0}], "")
    assert not score.improved({"mse": 0.3})
    assert score.improved({"mse": 0.1}) and score.best[""] == 0.1
    assert score.improved({"mse": 9.0}, "_ema")  # the first EMA value is the best so far
    images = lk_main.Score(lk_main.get_args_parser().parse_args([]))
    assert images.improved({"acc1": 10.0}) and not images.improved({"acc1": 5.0})


@pytest.mark.parametrize("argv,message", [
    (["--data_set", "co2", "--layer_decay", "0.8"],
     "--layer_decay applies to image data sets, not to --data_set co2 (timeseries)"),
    (["--data_set", "co2", "--pred_len", "0"], "--pred_len must be > 0, got 0"),
    (["--data_set", "synthetic_video", "--d_model", "-3"], "--d_model must be > 0, got -3"),
])
def test_bad_modality_flags_give_one_line(argv, message, capsys):
    assert lk_main.cli(BASE + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@needs_extras
def test_series_that_cannot_form_a_square_image_is_one_line(capsys):
    assert lk_main.cli(BASE + ["--data_set", "co2", "--input_size", "30", "--d_model", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seq_len=30, d_model=7" in err[0]


def test_input_size_defaults_per_data_set():
    for name, spec in modalities.DATA_SETS.items():
        args = lk_main.get_args_parser().parse_args(["--data_set", name])
        lk_main.validate_args(args)
        assert args.input_size == spec.default_input_size
    args = lk_main.get_args_parser().parse_args([])
    lk_main.validate_args(args)
    assert args.input_size == 224


def test_clip_to_image_is_the_upstream_memory_reshape():
    clip = torch.arange(2 * 3 * 16 * 8 * 12, dtype=torch.float32).reshape(2, 3, 16, 8, 12)
    image = clip_to_image(clip)
    assert image.shape == (2, 3, 32, 48)
    for b, c, r, q in [(0, 0, 0, 0), (1, 2, 31, 47), (0, 1, 5, 13), (1, 0, 17, 30)]:
        # Image row r, column q is element r * 4W + q of the channel's (T, H, W) block.
        flat = r * 48 + q
        t, rest = divmod(flat, 8 * 12)
        h, w = divmod(rest, 12)
        assert image[b, c, r, q] == clip[b, c, t, h, w]
    # Frame t fills image rows t * H / 4 .. (t + 1) * H / 4 - 1: not a 4 x 4 tiling.
    assert torch.equal(image[:, :, 2:4].flatten(2), clip[:, :, 1].flatten(2))
    assert torch.equal(clip_to_image(clip.flatten(1, 2)), image)
    with pytest.raises(ValueError, match="needs 16 frames, got 8"):
        clip_to_image(clip[:, :, :8])


def test_video_model_mixes_clips_before_the_reshape():
    model = create_video_classifier("unireplknet_a", 4)
    assert model(torch.randn(2, 3, 16, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"expected a clip \(B, C, 16, H, W\)"):
        model(torch.randn(2, 3, 16, 16))


def test_point_renderer_projects_and_passes_gradients():
    rotations = view_rotations(4)
    eye = torch.eye(3).expand(4, 3, 3)
    assert torch.allclose(rotations @ rotations.transpose(1, 2), eye, atol=1e-6)
    assert torch.allclose(torch.det(rotations), torch.ones(4), atol=1e-6)
    renderer = PointRenderer(image_size=33, num_views=4, sigma=1.0)
    # Two opposite points on the vertical axis: centred and scaled, they sit at (0, +-1, 0).
    points = torch.tensor([[[0.0, 2.0, 0.0], [0.0, -2.0, 0.0]]], requires_grad=True)
    images = renderer(points)
    assert images.shape == (1, 4, 3, 33, 33)
    coverage = images.sum(dim=2)[0]
    for view, rotation in enumerate(rotations):
        top = rotation @ torch.tensor([0.0, 1.0, 0.0])
        row = round((1 - top[1].item()) * 32 / 2)
        col = round((top[0].item() + 1) * 32 / 2)
        assert coverage[view, row, col] > 0.5 * coverage[view].max()
        assert coverage[view, 0, 0] < 1e-6  # far from both points: empty
    images.sum().backward()
    assert points.grad is not None and points.grad.abs().sum() > 0
    assert renderer.colour[0].weight.grad.abs().sum() > 0


@pytest.mark.slow
@needs_extras
def test_forecasting_under_two_processes_scores_every_window_once(tmp_path):
    """torchrun on gloo: each rank evaluates its share of the windows, the sums are all-reduced;
    the naive baseline, which does not depend on the weights, equals the one-process number."""
    import socket
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = BASE + ["--data_set", "co2", "--input_size", "16", "--pred_len", "4",
                   "--eval_subset", "41"]
    logs = []
    for nproc in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / f"n{nproc}"
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
             f"--master_port={port}", "main.py"] + argv + ["--output_dir", str(out)],
            cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
            timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append(read_log(out)[-1])
    assert "; 164 values)" in done.stdout  # 41 windows x 4 steps, over both ranks
    # Equal up to the float32 rounding of per-batch sums; a window lost or counted twice would
    # move them by about 1/41.
    for key in ("test_naive_mse", "test_naive_mae"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-6)


def test_audio_file_at_the_wrong_rate_is_one_line_with_workers(tmp_path, capsys):
    write_tone_folder(tmp_path / "sc")
    write_tone_folder(tmp_path / "sc8k", rate=8000)
    bad = tmp_path / "sc" / "train" / "low" / "0.wav"
    os.replace(tmp_path / "sc8k" / "train" / "low" / "0.wav", bad)
    argv = BASE + ["--data_set", "speech_commands", "--data_path", str(tmp_path / "sc"),
                   "--input_size", "32", "--num_workers", "2", "--train_subset", "0"]
    assert lk_main.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad} is sampled at 8000 Hz; accepted: 16000 Hz (resample the "
                   "dataset first)"]
