"""Time series (issue 21): the token-to-image reshape, per-series normalisation, the forecaster and
classifier on a tiny UniRepLKNet, and the packaged data sets (statsmodels, sktime)."""
import argparse
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.timeseries import (SeriesNorm, create_forecaster, create_series_classifier,
                               image_side, image_to_series, series_to_image)
from modalities import timeseries as ts
from utils import UserError

# The data sets need the optional extras; the model tests do not.
needs_extras = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("statsmodels", "sktime")),
    reason="pip install statsmodels sktime")

BACKBONE = "unireplknet_a"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"input_size": 32, "pred_len": 8, **kwargs})


@pytest.fixture(scope="module")
def co2() -> np.ndarray:
    return ts.load_co2()


# --- reshape -----------------------------------------------------------------------------------

def test_series_to_image_is_a_row_major_reshape():
    x = torch.randn(3, 8, 18)  # 8 * 18 = 144 = 12^2
    img = series_to_image(x)
    assert img.shape == (3, 1, 12, 12)
    flat = x.reshape(3, -1)
    for n in range(3):
        for i in range(12):
            for j in range(12):
                assert img[n, 0, i, j] == flat[n, i * 12 + j]


def test_square_tokens_give_one_time_step_per_row():
    x = torch.randn(2, 16, 16)
    img = series_to_image(x)
    for t in range(16):
        assert torch.equal(img[:, 0, t], x[:, t])


def test_image_round_trip():
    x = torch.randn(4, 48, 12)  # 48 * 12 = 576 = 24^2
    assert torch.equal(image_to_series(series_to_image(x), 48, 12), x)


def test_non_square_product_names_what_works():
    with pytest.raises(ValueError,
                       match=r"seq_len=48, d_model=100.*3 times a square, e\.g\. 75 or 108"):
        series_to_image(torch.randn(2, 48, 100))
    for d_model in (75, 108, 768):
        assert image_side(48, d_model) ** 2 == 48 * d_model
    with pytest.raises(ValueError, match="expects"):
        image_to_series(torch.randn(2, 1, 10, 10), 48, 12)


# --- SeriesNorm ----------------------------------------------------------------------------------

def test_series_norm_standardises_each_series_and_round_trips():
    torch.manual_seed(0)
    x = torch.randn(4, 50, 3, dtype=torch.float64) * torch.tensor([1.0, 30.0, 0.01]) + \
        torch.tensor([-5.0, 400.0, 2.0])
    norm = SeriesNorm(3).double()
    z, stats = norm.normalize(x)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(4, 3, dtype=torch.float64))
    # eps = 1e-5 in the variance: the third series' variance is 1e-4, so its std is 1/sqrt(1.1).
    expected_std = torch.sqrt(x.var(dim=1, unbiased=False) / (x.var(dim=1, unbiased=False) + 1e-5))
    torch.testing.assert_close(z.std(dim=1, unbiased=False), expected_std)
    assert stats.mean.shape == stats.std.shape == (4, 1, 3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, -0.5, 1.5]))
        norm.bias.copy_(torch.tensor([0.3, 1.0, -2.0]))
    z_affine, _ = norm.normalize(x)
    torch.testing.assert_close(z_affine, z * norm.weight + norm.bias)
    torch.testing.assert_close(norm.denormalize(z_affine, stats), x)


# --- models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def forecaster():
    torch.manual_seed(0)
    return create_forecaster(BACKBONE, seq_len=16, pred_len=5, n_vars=3)


def test_forecaster_shape_and_gradients(forecaster):
    assert forecaster.image_size == 16  # d_model defaults to seq_len
    forecaster.train()
    forecaster.zero_grad()
    out = forecaster(torch.randn(2, 16, 3))
    assert out.shape == (2, 5, 3)
    out.square().mean().backward()
    stem = forecaster.backbone.downsample_layers[0][0].weight
    for param in (stem, forecaster.value_embed.weight, forecaster.pos_embed, forecaster.norm.weight,
                  forecaster.head.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expected a \(B, seq_len=16, n_vars=3\) series, "
                                         r"got shape \(2, 16, 2\)"):
        forecaster(torch.randn(2, 16, 2))
    with pytest.raises(ValueError, match="got shape"):
        forecaster(torch.randn(16, 3))


@torch.no_grad()
def test_forecaster_is_channel_independent_and_scale_equivariant(forecaster):
    forecaster.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 16, 3, dtype=torch.float64)
    model = forecaster.double()
    try:
        out = model(x)
        perturbed = x.clone()
        perturbed[:, :, 0] = torch.randn(2, 16, dtype=torch.float64)
        out_perturbed = model(perturbed)
        assert not torch.allclose(out_perturbed[..., 0], out[..., 0])
        assert torch.equal(out_perturbed[..., 1:], out[..., 1:])
        # Per-window normalisation: rescaling and shifting a series does the same to its forecast.
        scale, shift = torch.tensor([3.0, 0.5, 10.0]), torch.tensor([100.0, -2.0, 0.0])
        torch.testing.assert_close(model(x * scale + shift), out * scale + shift,
                                   rtol=1e-4, atol=1e-4)
    finally:
        forecaster.float()


def test_forecaster_options_pass_through():
    model = create_forecaster(BACKBONE, seq_len=12, pred_len=4, n_vars=1, d_model=27,
                              drop_path_rate=0.2)
    assert model.image_size == 18
    assert model.backbone.stages[3][-1].drop_path.drop_prob == pytest.approx(0.2)
    assert model.no_weight_decay() == {"pos_embed"}
    with pytest.raises(ValueError, match="seq_len=12, d_model=10"):
        create_forecaster(BACKBONE, seq_len=12, pred_len=4, n_vars=1, d_model=10)


def test_classifier_shape_and_gradients():
    torch.manual_seed(0)
    model = create_series_classifier(BACKBONE, seq_len=20, n_vars=6, num_classes=4)
    logits = model(torch.randn(3, 20, 6))
    assert logits.shape == (3, 4)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 3])).backward()
    for param in (model.backbone.downsample_layers[0][0].weight, model.value_embed.weight,
                  model.pos_embed):
        assert param.grad is not None and param.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"n_vars=6\) series, got shape \(3, 20, 5\)"):
        model(torch.randn(3, 20, 5))


# --- data --------------------------------------------------------------------------------------

@needs_extras
def test_co2_is_filled_by_linear_interpolation(co2):
    import statsmodels.datasets
    raw = statsmodels.datasets.co2.load_pandas().data["co2"].to_numpy()
    assert co2.shape == (2284, 1) and co2.dtype == np.float64
    assert not np.isnan(co2).any()
    missing = np.flatnonzero(np.isnan(raw))
    assert len(missing) == 59
    np.testing.assert_array_equal(co2[~np.isnan(raw), 0], raw[~np.isnan(raw)])
    # Week 6 is a one-week gap: the midpoint of its neighbours. Weeks 9-13 are one 5-week gap.
    assert 6 in missing and 5 not in missing and 7 not in missing
    assert co2[6, 0] == pytest.approx((raw[5] + raw[7]) / 2)
    assert list(missing[1:6]) == [9, 10, 11, 12, 13] and missing[6] > 14
    assert co2[11, 0] == pytest.approx(raw[8] + (raw[14] - raw[8]) * 3 / 6)


@needs_extras
def test_macrodata_columns():
    data = ts.load_macrodata()
    assert data.shape == (203, 12) and np.isfinite(data).all()
    assert data[0, ts.MACRO_COLUMNS.index("realgdp")] == pytest.approx(2710.349)


def test_windows_count_alignment_and_scaling():
    length, seq_len, pred_len = 200, 10, 4
    series = np.stack([np.arange(length), 2.0 * np.arange(length) + 7], axis=1)
    train = ts.ForecastWindows(series, seq_len, pred_len, "train")
    test = ts.ForecastWindows(series, seq_len, pred_len, "test")
    n_train, test_start = 140, 160
    assert len(train) == n_train - seq_len - pred_len + 1
    assert len(test) == length - test_start - pred_len + 1
    assert (train.seq_len, train.pred_len, train.n_vars) == (seq_len, pred_len, 2)
    np.testing.assert_allclose(train.mean, series[:n_train].mean(0))
    np.testing.assert_allclose(test.std, series[:n_train].std(0))

    def original(v: torch.Tensor) -> np.ndarray:
        return v.numpy().astype(np.float64) * train.std + train.mean

    for ds, index in ((train, 0), (train, len(train) - 1), (test, 0), (test, len(test) - 1)):
        x, y = ds[index]
        assert x.dtype == y.dtype == torch.float32
        assert x.shape == (seq_len, 2) and y.shape == (pred_len, 2)
        x0, y0 = original(x)[:, 0], original(y)[:, 0]
        # y starts right after x ends: x and y together are 14 consecutive steps.
        np.testing.assert_allclose(np.concatenate([x0, y0]), x0[0] + np.arange(14), atol=1e-3)
    # Training targets stay inside the first 70%; test targets cover exactly the last 20%.
    assert original(train[len(train) - 1][1])[-1, 0] == pytest.approx(n_train - 1, abs=1e-3)
    assert original(test[0][1])[0, 0] == pytest.approx(test_start, abs=1e-3)
    assert original(test[len(test) - 1][1])[-1, 0] == pytest.approx(length - 1, abs=1e-3)


@needs_extras
def test_too_short_series_is_a_user_error():
    with pytest.raises(UserError,
                       match=r"macrodata has 203 steps.*seq_len \+ pred_len must be at most 142"):
        ts.build_timeseries_dataset("macrodata", True, _args(input_size=150))
    with pytest.raises(UserError, match=r"macrodata has 203 steps.*pred_len must be at most 40"):
        ts.build_timeseries_dataset("macrodata", False, _args(input_size=8, pred_len=41))
    with pytest.raises(UserError, match="accepted: co2, macrodata, gunpoint"):
        ts.build_timeseries_dataset("weather", True, _args())


def test_naive_baseline_and_errors():
    x = torch.randn(3, 10, 2)
    pred = ts.naive_last_value(x, 4)
    assert pred.shape == (3, 4, 2)
    for step in range(4):
        assert torch.equal(pred[:, step], x[:, -1])
    target = torch.randn(3, 4, 2)
    errors = ts.forecast_errors(pred, target)
    assert errors["mse"] == pytest.approx(float(((pred - target) ** 2).sum()) / 24, rel=1e-6)
    assert errors["mae"] == pytest.approx(float((pred - target).abs().sum()) / 24, rel=1e-6)


def test_missing_package_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "statsmodels.datasets", None)
    with pytest.raises(UserError, match=r"^[^\n]*pip install statsmodels$"):
        ts.load_co2()
    monkeypatch.setitem(sys.modules, "sktime.datasets", None)
    ts._load_sktime.cache_clear()
    with pytest.raises(UserError, match=r"^[^\n]*pip install sktime$"):
        ts.SeriesClassification("gunpoint")


def test_model_and_data_modules_do_not_import_the_extras():
    code = ("import sys, models.timeseries, modalities.timeseries; "
            "assert not {'statsmodels', 'sktime'} & set(sys.modules), 'extra imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@needs_extras
def test_forecaster_learns_on_co2_windows(co2):
    torch.manual_seed(0)
    windows = ts.ForecastWindows(co2, seq_len=32, pred_len=8, split="train", name="co2")
    batch = [windows[i] for i in range(0, len(windows), len(windows) // 16)][:16]
    x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    model = create_forecaster(BACKBONE, seq_len=32, pred_len=8, n_vars=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@needs_extras
@pytest.mark.parametrize("name, size, seq_len, n_vars, num_classes", [
    ("gunpoint", 50, 150, 1, 2),
    ("basicmotions", 40, 100, 6, 4),
    ("japanese_vowels", 270, 29, 12, 9),
])
def test_classification_sets(name, size, seq_len, n_vars, num_classes):
    dataset, classes = ts.build_timeseries_dataset(name, True, _args(input_size=224))
    assert ts.TASKS[name] == "classification" and classes == num_classes
    assert (len(dataset), dataset.seq_len, dataset.n_vars, dataset.num_classes) == \
        (size, seq_len, n_vars, num_classes)
    x, label = dataset[0]
    assert x.shape == (seq_len, n_vars) and x.dtype == torch.float32 and label.dtype == torch.int64
    assert sorted(set(dataset.targets.tolist())) == list(range(num_classes))


@needs_extras
def test_japanese_vowels_pads_with_the_last_value():
    train = ts.SeriesClassification("japanese_vowels", "train")
    test = ts.SeriesClassification("japanese_vowels", "test")
    assert train.seq_len == test.seq_len == 29 and train.classes == test.classes
    assert train.classes == [str(i) for i in range(1, 10)]
    assert train.lengths.min() == 7 and train.lengths.max() == 26 and test.lengths.max() == 29
    i = int(np.argmin(train.lengths))
    x, _ = train[i]
    assert torch.equal(x[7:], x[6:7].expand(22, 12))
    assert not torch.equal(x[6], x[5])


@needs_extras
def test_tasks_cover_every_builder():
    assert set(ts.TASKS) == {"co2", "macrodata", "gunpoint", "basicmotions", "japanese_vowels"}
    for name in ("co2", "macrodata"):
        dataset, pred_len = ts.build_timeseries_dataset(name, False, _args())
        assert ts.TASKS[name] == "forecasting" and pred_len == 8 == dataset.pred_len
        assert dataset.seq_len == 32
    dataset, pred_len = ts.build_timeseries_dataset("co2", True, argparse.Namespace(input_size=32))
    assert pred_len == 24 == dataset.pred_len
