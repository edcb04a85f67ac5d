"""SLaK dynamic sparse training: densities, exact zeros (also under AMP), prune/regrow, resume."""
import argparse
import io

import pytest
import torch
import torch.nn.functional as F

from models.slak import SLaK
from sparse import Masking, add_sparse_args, prune_rate_at


def _args(*argv, epochs=2):
    parser = argparse.ArgumentParser()
    add_sparse_args(parser)
    args = parser.parse_args(list(argv))
    args.epochs = epochs
    return args


def _model():
    torch.manual_seed(0)
    return SLaK(num_classes=4, depths=(1, 1, 1, 1), dims=(16, 16, 32, 32),
                kernel_size=[13, 11, 9, 7, 3], Decom=True)


def _batch(n=4):
    return torch.randn(n, 3, 32, 32), torch.randint(0, 4, (n,))


def _overall_density(masking):
    active = sum(int((p != 0).sum()) for p in masking.params.values())
    return active / sum(p.numel() for p in masking.params.values())


def _train_steps(model, optimizer, masking, steps, scaler=None):
    for _ in range(steps):
        images, targets = _batch()
        optimizer.zero_grad()
        if scaler is None:
            F.cross_entropy(model(images), targets).backward()
            optimizer.step()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        masking.step()


def test_flags_as_upstream():
    args = _args("--sparse", "-u", "2000", "--sparsity", "0.5", "--only-L", "--fix",
                 "--growth", "gradient", "--sparse_init", "ERK", "--prune_rate", "0.5")
    assert (args.sparse, args.update_frequency, args.sparsity, args.only_L, args.fix) == (
        True, 2000, 0.5, True, True)
    defaults = _args()
    assert (defaults.sparse, defaults.sparsity, defaults.sparse_init, defaults.update_frequency,
            defaults.prune_rate, defaults.prune, defaults.growth, defaults.redistribution,
            defaults.only_L, defaults.fix, defaults.verbose) == (
        False, 0.4, "snip", 100, 0.3, "magnitude", "random", "none", False, False, False)
    with pytest.raises(SystemExit):
        _args("--growth", "SET")


@pytest.mark.parametrize("init", ["snip", "ERK", "uniform"])
def test_density_after_init_is_the_target(init):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masking = Masking(model, optimizer, _args("--sparse_init", init), steps_per_epoch=5)
    masking.init(_batch(8) if init == "snip" else None)
    assert abs(_overall_density(masking) - 0.6) < 0.005
    report = masking.densities()
    assert set(report) == set(masking.masks) | {"total"}
    assert "total density" in masking.density_report()


def test_only_L_masks_only_the_LoRA_strips():
    model = _model()
    masking = Masking(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      _args("--only-L", "--sparse_init", "uniform"), steps_per_epoch=5)
    masking.init()
    assert masking.masks and all("large_kernel.LoRA" in n for n in masking.masks)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_masked_weights_stay_exactly_zero_after_steps(opt):
    model = _model()
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05) if opt == "adamw"
                 else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    masking = Masking(model, optimizer, _args("--sparse_init", "uniform", "-u", "1000"),
                      steps_per_epoch=5)
    masking.init()
    _train_steps(model, optimizer, masking, 3)
    for name, mask in masking.masks.items():
        param = masking.params[name]
        assert torch.all(param[~mask] == 0) and torch.any(param[mask] != 0)
        if opt == "sgd":
            assert torch.all(optimizer.state[param]["momentum_buffer"][~mask] == 0)


def test_amp_steps_keep_zeros_and_a_skipped_step_is_not_counted():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    masking = Masking(model, optimizer, _args("--sparse_init", "uniform", "-u", "2"),
                      steps_per_epoch=5, grad_scaler=scaler)
    masking.init()
    _train_steps(model, optimizer, masking, 2, scaler)
    assert masking.steps == 2  # the second step pruned and regrew
    for name, mask in masking.masks.items():
        assert torch.all(masking.params[name][~mask] == 0)
    # An inf gradient: the scaler skips optimizer.step and lowers its scale.
    optimizer.zero_grad()
    images, targets = _batch()
    loss = F.cross_entropy(model(images), targets) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert masking.step() is False and masking.steps == 2
    _train_steps(model, optimizer, masking, 1, scaler)
    assert masking.steps == 3


@pytest.mark.parametrize("growth", ["random", "gradient", "momentum"])
def test_prune_and_regrow_keep_exact_counts_and_move_weights(growth):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masking = Masking(model, optimizer, _args("--sparse_init", "uniform", "-u", "2",
                                              "--growth", growth, "--prune_rate", "0.5"),
                      steps_per_epoch=5)
    masking.init()
    before = {n: m.clone() for n, m in masking.masks.items()}
    _train_steps(model, optimizer, masking, 1)
    assert masking.masks.keys() == before.keys()
    images, targets = _batch()
    optimizer.zero_grad()
    F.cross_entropy(model(images), targets).backward()
    optimizer.step()
    assert masking.step() is True
    changed = 0
    for name, mask in masking.masks.items():
        assert int(mask.sum()) == int(before[name].sum())
        changed += int((mask & ~before[name]).sum())
        assert torch.all(masking.params[name][~mask] == 0)
    assert changed > 0


def test_prune_rate_follows_the_cosine_from_the_start_epoch():
    assert prune_rate_at(0, 0.3, 100) == pytest.approx(0.3)
    assert prune_rate_at(50, 0.3, 100) == pytest.approx((0.3 + 0.005) / 2)
    assert prune_rate_at(100, 0.3, 100) == pytest.approx(0.005)
    model = _model()
    masking = Masking(model, torch.optim.SGD(model.parameters(), lr=0.1), _args(epochs=4),
                      steps_per_epoch=25, start_epoch=2)
    assert masking.steps == 50 and masking.prune_rate == pytest.approx((0.3 + 0.005) / 2)


def test_resume_restores_identical_masks():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masking = Masking(model, optimizer, _args("--sparse_init", "ERK"), steps_per_epoch=5)
    masking.init()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "masks": masking.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed = _model()  # dense, freshly initialised weights
    resumed.load_state_dict(checkpoint["model"])
    masking2 = Masking(resumed, torch.optim.AdamW(resumed.parameters()), _args(),
                       steps_per_epoch=5, start_epoch=1)
    masking2.load_state_dict(checkpoint["masks"])
    assert masking2.masks.keys() == masking.masks.keys()
    for name in masking.masks:
        assert torch.equal(masking2.masks[name], masking.masks[name])
    with pytest.raises(KeyError, match="do(es)? not sparsify"):
        masking2.load_state_dict({"head.bias": torch.ones(4, dtype=torch.bool)})

    # Upstream's way for checkpoints without masks: the non-zeros of the loaded weights.
    from_weights = Masking(resumed, torch.optim.AdamW(resumed.parameters()),
                           _args("--sparse_init", "resume"), steps_per_epoch=5)
    from_weights.init()
    for name in masking.masks:
        assert torch.equal(from_weights.masks[name], masking.masks[name])


def test_ema_copy_is_kept_sparse():
    model = _model()
    masking = Masking(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      _args("--sparse_init", "uniform"), steps_per_epoch=5)
    masking.init()
    ema = _model()
    masking.update_ema(ema)
    ema_params = dict(ema.named_parameters())
    for name, mask in masking.masks.items():
        assert torch.all(ema_params[name][~mask] == 0)
        assert torch.any(ema_params[name][mask] != 0)
