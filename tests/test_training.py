"""End-to-end behaviour of main.py on the embedded Fashion-MNIST set (CPU, small and seeded)."""
import glob
import json
import os

import pytest
import torch

import engine
import main as lk_main

FAST = ["--model", "convnext_atto", "--device", "cpu", "--input_size", "32", "--batch_size", "32",
        "--num_workers", "0", "--lr", "2e-3", "--warmup_epochs", "1", "--aa", "none",
        "--reprob", "0", "--train_subset", "960", "--eval_subset", "400"]


def run(argv):
    """main.py's command line in this process: returns (exit code, stats of the last epoch)."""
    args = lk_main.get_args_parser().parse_args(argv)
    return lk_main.main(args)


def run_killed_in_epoch(argv, epoch, monkeypatch):
    """main.py's command line, killed as it starts training ``epoch`` (after the checkpoints of
    the epochs before it were written)."""
    real_train = lk_main.train_one_epoch

    def crash(*args, **kwargs):
        if args[5] == epoch:
            raise KeyboardInterrupt(f"simulated kill during epoch {epoch}")
        return real_train(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(lk_main, "train_one_epoch", crash)
        with pytest.raises(KeyboardInterrupt):
            run(argv)


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three epochs with EMA, mixup and drop path, as a user would train."""
    out = tmp_path_factory.mktemp("run")
    argv = FAST + ["--epochs", "3", "--model_ema", "true", "--model_ema_decay", "0.9",
                   "--model_ema_eval", "true", "--drop_path", "0.1", "--mixup", "0.2",
                   "--cutmix", "0", "--output_dir", str(out), "--log_dir", str(out / "tb")]
    stats = run(argv)
    return out, argv, stats


def test_training_learns_and_writes_logs_and_checkpoints(trained):
    out, _, stats = trained
    log = read_log(out)
    assert [row["epoch"] for row in log] == [0, 1, 2]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.1
    # 10 balanced classes: chance is 10%.
    assert log[-1]["test_acc1"] > 40.0
    assert stats["test_acc1"] == log[-1]["test_acc1"]
    for key in ("train_lr", "test_acc5", "test_loss", "test_acc1_ema", "n_parameters"):
        assert key in log[-1]
    assert glob.glob(str(out / "tb" / "events.out.tfevents*"))
    names = sorted(os.path.basename(p) for p in glob.glob(str(out / "checkpoint-*.pth")))
    assert names == ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth",
                     "checkpoint-best-ema.pth", "checkpoint-best.pth"]
    ckpt = torch.load(out / "checkpoint-2.pth", map_location="cpu", weights_only=False)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args", "model_ema"}
    assert ckpt["epoch"] == 2
    assert not glob.glob(str(out / "*.tmp*"))


def test_ema_differs_from_model_and_loads_back(trained, tmp_path):
    out, argv, _ = trained
    ckpt = torch.load(out / "checkpoint-2.pth", map_location="cpu", weights_only=False)
    differs = [k for k, v in ckpt["model"].items()
               if v.is_floating_point() and not torch.equal(v, ckpt["model_ema"][k])]
    assert len(differs) > 10
    args = lk_main.get_args_parser().parse_args(argv + ["--resume", str(out / "checkpoint-2.pth")])
    args.nb_classes = 10
    model = lk_main.build_model(args, 10)
    from timm.utils import ModelEmaV2
    ema = ModelEmaV2(model)
    import utils
    utils.auto_load_model(args, model, None, None, ema)
    for key, value in ckpt["model_ema"].items():
        assert torch.equal(ema.module.state_dict()[key], value)
    for key, value in ckpt["model"].items():
        assert torch.equal(model.state_dict()[key], value)
    assert args.start_epoch == 3


def test_eval_with_resume_reproduces_logged_accuracy(trained):
    out, _, _ = trained
    logged = read_log(out)[1]
    stats = run(FAST + ["--eval", "true", "--resume", str(out / "checkpoint-1.pth"),
                        "--model_ema", "true", "--model_ema_eval", "true"])
    assert stats["acc1"] == pytest.approx(logged["test_acc1"], abs=1e-9)
    assert stats["acc5"] == pytest.approx(logged["test_acc5"], abs=1e-9)
    assert stats["acc1_ema"] == pytest.approx(logged["test_acc1_ema"], abs=1e-9)


@pytest.mark.slow
def test_auto_resume_after_a_crash_matches_uninterrupted_run(trained, tmp_path, monkeypatch):
    out, argv, _ = trained
    resumed = tmp_path / "resumed"
    argv = [a if a != str(out) else str(resumed) for a in argv]
    argv = [a if a != str(out / "tb") else str(resumed / "tb") for a in argv]

    run_killed_in_epoch(argv, 2, monkeypatch)
    assert sorted(os.listdir(resumed)) == sorted(
        ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-best.pth",
         "checkpoint-best-ema.pth", "log.txt", "tb"])
    run(argv)  # --auto_resume is on by default

    full = torch.load(out / "checkpoint-2.pth", map_location="cpu", weights_only=False)
    again = torch.load(resumed / "checkpoint-2.pth", map_location="cpu", weights_only=False)
    for part in ("model", "model_ema"):
        for key, value in full[part].items():
            assert torch.equal(again[part][key], value), f"{part}.{key} differs after resume"
    assert [r["epoch"] for r in read_log(resumed)] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("amp_dtype", ["bfloat16", "float16"])
def test_amp_trains_on_cpu(tmp_path, amp_dtype):
    out = tmp_path / amp_dtype
    stats = run(FAST + ["--epochs", "1", "--use_amp", "true", "--amp_dtype", amp_dtype,
                        "--mixup", "0", "--cutmix", "0", "--train_subset", "320",
                        "--output_dir", str(out)])
    assert stats["train_loss"] > 0 and stats["test_acc1"] > 0
    ckpt = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    # fp16 needs loss scaling; bf16 runs with the scaler disabled.
    assert ("scale" in ckpt["scaler"]) == (amp_dtype == "float16")


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """update_freq 2 x batch 16 takes the same step as batch 32 (no BN, no dropout, SGD)."""
    import models
    import utils

    torch.manual_seed(0)
    data = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(2)]
    big = [(torch.cat([data[0][0], data[1][0]]), torch.cat([data[0][1], data[1][1]]))]
    results = []
    for loader, update_freq in ((data, 2), (big, 1)):
        torch.manual_seed(1)
        model = models.create_model("convnext_atto", num_classes=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader, optimizer,
                               torch.device("cpu"), 0, utils.LossScaler(False, "cpu"),
                               num_training_steps_per_epoch=1, update_freq=update_freq)
        results.append(model.state_dict())
    for key, value in results[0].items():
        assert torch.allclose(value, results[1][key], atol=1e-6, rtol=1e-5), key


def test_resume_trims_the_log_and_keeps_the_best_accuracy(trained, tmp_path):
    """A run killed after logging an epoch but before its checkpoint repeats that epoch once,
    and a resumed run does not replace checkpoint-best.pth with a worse epoch."""
    import shutil

    out, argv, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.remove(copy / "checkpoint-2.pth")  # killed after epoch 2 was logged, before its save
    best = torch.load(copy / "checkpoint-best.pth", map_location="cpu", weights_only=False)
    argv = [str(copy) if a == str(out) else a for a in argv]
    argv = [str(copy / "tb") if a == str(out / "tb") else a for a in argv]
    run(argv + ["--lr", "0"])  # epoch 2 again, learning nothing new
    assert [row["epoch"] for row in read_log(copy)] == [0, 1, 2]
    # With lr 0 the re-run epoch 2 scores exactly what epoch 1 did: not a new best.
    assert read_log(copy)[2]["test_acc1"] == read_log(out)[1]["test_acc1"]
    again = torch.load(copy / "checkpoint-best.pth", map_location="cpu", weights_only=False)
    for key, value in best["model"].items():
        assert torch.equal(again["model"][key], value), key


def test_eval_of_a_raw_state_dict_release_file(trained, tmp_path):
    """Upstream releases are often bare state dicts (no 'model' key, no epoch)."""
    out, _, _ = trained
    ckpt = torch.load(out / "checkpoint-1.pth", map_location="cpu", weights_only=False)
    raw = tmp_path / "release.pth"
    torch.save({"module." + k: v for k, v in ckpt["model"].items()}, raw)
    stats = run(FAST + ["--eval", "true", "--resume", str(raw)])
    assert stats["acc1"] == pytest.approx(read_log(out)[1]["test_acc1"], abs=1e-9)


def test_ema_forced_to_cpu_trains_and_evaluates(tmp_path):
    stats = run(FAST + ["--epochs", "1", "--train_subset", "320", "--model_ema", "true",
                        "--model_ema_force_cpu", "true", "--model_ema_eval", "true",
                        "--mixup", "0", "--cutmix", "0", "--output_dir", str(tmp_path)])
    assert 0 < stats["test_acc1_ema"] <= 100
    ckpt = torch.load(tmp_path / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    assert ckpt["model_ema"].keys() == ckpt["model"].keys()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_keys(tmp_path):
    # One epoch through torch.compile (inductor on the CPU here) against the same seeded run
    # eagerly: same losses up to kernel-fusion rounding, and checkpoints keyed as the plain model.
    argv = FAST + ["--epochs", "1", "--mixup", "0", "--cutmix", "0", "--train_subset", "320"]
    eager = run(argv + ["--output_dir", str(tmp_path / "eager")])
    compiled = run(argv + ["--compile", "--output_dir", str(tmp_path / "compiled")])
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-3)
    keys = [torch.load(tmp_path / d / "checkpoint-0.pth", map_location="cpu",
                       weights_only=False)["model"].keys() for d in ("eager", "compiled")]
    assert list(keys[0]) == list(keys[1])


# The flags that switch off parts of the default recipe (RandAugment, random erasing, mixup,
# cutmix, label smoothing): the runs below must not use them.
RECIPE_OFF = {"--aa", "--reprob", "--mixup", "--cutmix", "--smoothing"}


def test_the_default_recipe_trains(tmp_path, capsys):
    """Upstream's training line as users type it: RandAugment, random erasing, mixup, cutmix,
    label smoothing at their defaults, plus EMA and layer decay, on the embedded data."""
    argv = ["--model", "convnext_atto", "--device", "cpu", "--input_size", "32",
            "--batch_size", "32", "--num_workers", "2", "--epochs", "1", "--warmup_epochs", "0",
            "--train_subset", "640", "--eval_subset", "200", "--model_ema", "true",
            "--model_ema_eval", "true", "--layer_decay", "0.8", "--drop_path", "0.1",
            "--output_dir", str(tmp_path), "--log_dir", str(tmp_path / "tb")]
    import datasets

    args = lk_main.get_args_parser().parse_args(argv)
    steps = [type(t).__name__ for t in datasets.build_transform(True, args).transforms]
    assert {"RandAugment", "RandomErasing"} <= set(steps), steps
    assert lk_main.cli(argv) == 0
    text = capsys.readouterr().out
    assert "Mixup is activated!" in text and "criterion = SoftTargetCrossEntropy()" in text
    log = read_log(tmp_path)[-1]
    assert 0 < log["train_loss"] < 10 and 0 <= log["test_acc1_ema"] <= 100
    # Layer decay: the stem learns at 0.8 ** 13 of the head's rate.
    assert log["train_min_lr"] == pytest.approx(log["train_lr"] * 0.8 ** 13, rel=1e-6)


def test_the_readme_cpu_example_runs_with_the_default_recipe(tmp_path):
    with open(os.path.join(os.path.dirname(lk_main.__file__), "README.md")) as f:
        text = f.read()
    start = text.index("python main.py --model convnext_atto --device cpu")
    argv = text[start:text.index("```", start)].replace("\\\n", " ").split()[2:]
    assert not RECIPE_OFF & set(argv), argv
    options = dict(zip(argv[::2], argv[1::2]))
    assert int(options["--num_workers"]) <= 2  # what a laptop or this CI machine has
    # A CPU-sized version of the same command: fewer epochs and images.
    options.update({"--epochs": "1", "--train_subset": "320", "--eval_subset": "100",
                    "--output_dir": str(tmp_path)})
    assert lk_main.cli([token for pair in options.items() for token in pair]) == 0
    assert read_log(tmp_path)[-1]["epoch"] == 0


def test_the_demo_uses_the_default_recipe():
    with open(os.path.join(os.path.dirname(lk_main.__file__), "Makefile")) as f:
        makefile = f.read()
    start = makefile.index("DEMO_ARGS ?=")
    demo = makefile[start:makefile.index("\n\n", start)].replace("\\\n", " ").split()[2:]
    assert "--model" in demo and not RECIPE_OFF & set(demo), demo


def test_throughput_is_the_steady_rate_not_the_queued_batches(monkeypatch, capsys):
    """A loader-bound epoch: the first half of the batches were queued by the workers during
    warm-up and arrive at once, the rest take 1 s each (a fake clock). The reported rate is the
    loader's, about one batch per second, not the 1.75 batches per second that counting the
    queued batches gave."""
    import time

    import models
    import utils

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    batch, iterations = 8, 40

    def loader():
        for i in range(iterations):
            if i >= iterations // 2:
                clock[0] += 1.0
            yield torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    model = models.create_model("convnext_atto", num_classes=10)
    stats = engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader(),
                                   torch.optim.SGD(model.parameters(), lr=0.1),
                                   torch.device("cpu"), 0, utils.LossScaler(False, "cpu"),
                                   num_training_steps_per_epoch=iterations, print_freq=100)
    # 20 timed batches, 19 of them loaded inside the timed window.
    assert stats["images_per_sec"] == pytest.approx(batch * 20 / 19)
    assert f"Training throughput: {batch * 20 / 19:.1f} images/s" in capsys.readouterr().out
