"""SLaK sparse training through main.py on the embedded data: masks in checkpoints, resume."""
import pytest
import torch

from test_training import run, run_killed_in_epoch

SPARSE = ["--model", "SLaK_tiny", "--kernel_size", "7", "7", "7", "7", "3", "--Decom", "true",
          "--width_factor", "0.25", "--device", "cpu", "--input_size", "32", "--batch_size", "16",
          "--num_workers", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
          "--train_subset", "64", "--eval_subset", "32", "--warmup_epochs", "0", "--epochs", "2",
          "--sparse", "--sparsity", "0.5", "--sparse_init", "snip", "-u", "2",
          "--prune_rate", "0.3", "--model_ema", "true", "--model_ema_decay", "0.5"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse")
    stats = run(SPARSE + ["--output_dir", str(out)])
    return out, stats


def test_sparse_run_keeps_density_and_saves_masks(sparse_run):
    out, stats = sparse_run
    assert stats["sparse_density"] == pytest.approx(0.5, abs=0.005)
    ckpt = load(out / "checkpoint-1.pth")
    masks = ckpt["masks"]
    assert any(".large_kernel.LoRA1.conv.weight" in name for name in masks)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert torch.count_nonzero(ckpt["model"][name][~mask]) == 0, name
        assert torch.count_nonzero(ckpt["model_ema"][name][~mask]) == 0, name
    # 4 updates per epoch with -u 2: masks changed during training.
    first = load(out / "checkpoint-0.pth")["masks"]
    assert any(not torch.equal(first[n], masks[n]) for n in masks)


def test_resume_restores_masks_and_matches_uninterrupted(sparse_run, tmp_path, monkeypatch,
                                                         capsys):
    out, _ = sparse_run
    resumed = tmp_path / "resumed"
    run_killed_in_epoch(SPARSE + ["--output_dir", str(resumed)], 1, monkeypatch)
    capsys.readouterr()
    run(SPARSE + ["--output_dir", str(resumed)])
    assert "Restored" in capsys.readouterr().out
    full, again = load(out / "checkpoint-1.pth"), load(resumed / "checkpoint-1.pth")
    for name, mask in full["masks"].items():
        assert torch.equal(again["masks"][name], mask), name
    for key, value in full["model"].items():
        assert torch.equal(again["model"][key], value), key
