"""Data: the training augmentations never crash, and bad data stops a run with one line naming
it (or, with --skip_bad_images, is skipped, named and counted)."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment
from timm.data.auto_augment import AugmentOp
from torchvision import transforms

import datasets as lk_data
import main as lk_main
from test_bad_input import cli_error

AA_VALUES = ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m9-n3-mstd0.5-inc1", "v0", "v0r",
             "original", "originalr", "3a", "augmix-m5-w4-d2", "none"]
# Policies without a Posterize op (3a's ops are Solarize, Desaturate and GaussianBlur).
NO_POSTERIZE = {"3a", "none"}

TINY = ["--model", "convnext_atto", "--device", "cpu", "--input_size", "32", "--batch_size", "4",
        "--epochs", "1", "--num_workers", "0", "--aa", "none", "--reprob", "0", "--mixup", "0",
        "--cutmix", "0", "--warmup_epochs", "0", "--data_set", "image_folder"]


def train_transform(*flags):
    args = lk_main.get_args_parser().parse_args(["--input_size", "32", *flags])
    return lk_data.build_transform(True, args)


def random_images(count, seed):
    """Seeded random images of varied sizes (1 to 80 px a side, extreme aspect ratios too),
    contents (noise, flat colour, few levels) and source modes, converted to RGB as
    datasets.load_rgb does."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA", "P", "1", "CMYK", "LA", "I", "F"]
    for i in range(count):
        height, width = (int(v) for v in rng.integers(1, 81, size=2))
        kind = i % 3
        if kind == 0:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        elif kind == 1:
            pixels = np.full((height, width, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        else:
            pixels = (rng.integers(0, 3, (height, width, 3)) * 127).astype(np.uint8)
        mode = modes[i % len(modes)]
        if mode == "P":  # a random palette (converting RGB to P quantizes, 30x slower)
            image = Image.fromarray(pixels[..., 0])
            image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        else:
            image = Image.fromarray(pixels).convert(mode)
        yield image.convert("RGB")


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_default_training_augmentation_survives_20000_images():
    # main.py's defaults: --aa rand-m9-mstd0.5-inc1, --reprob 0.25, --color_jitter 0.4. Before
    # the Posterize guard about 1 image in 600 raised ValueError here on Pillow 13.
    transform = train_transform()
    seed_all(0)
    for image in random_images(20_000, seed=0):
        assert transform(image).shape == (3, 32, 32)


def _timm_objects(obj, seen=None):
    """Every object reachable from a transform through timm's and torchvision's objects,
    found without knowing how the transforms nest (independent of lknets' own walk)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif type(obj).__module__.split(".")[0] in ("timm", "torchvision") and hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        children = []
    for child in children:
        yield from _timm_objects(child, seen)


@pytest.mark.parametrize("aa", AA_VALUES)
def test_every_aa_policy_survives_random_images(aa):
    transform = train_transform("--aa", aa)
    posterize_ops = [obj for obj in _timm_objects(transform)
                     if isinstance(obj, AugmentOp) and obj.name.startswith("Posterize")]
    assert all(op.aug_fn is lk_data.posterize for op in posterize_ops)
    assert bool(posterize_ops) == (aa not in NO_POSTERIZE)
    seed_all(1)
    for image in random_images(1000 if aa.startswith("augmix") else 2500, seed=1):
        assert transform(image).shape == (3, 32, 32)


def test_guarded_posterize_keeps_the_augmentation_meaning():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    black = lk_data.posterize(image, 0)
    assert black.mode == "RGB" and black.size == image.size
    assert not np.asarray(black).any()
    for bits in range(1, 8):
        assert lk_data.posterize(image, bits).tobytes() == ImageOps.posterize(image, bits).tobytes()
    assert lk_data.posterize(image, 8) is image


def test_zero_bit_posterize_op_is_black_only_through_the_guard():
    # PosterizeIncreasing at magnitude 10 keeps 0 bits: what RandAugment's 'inc1' policy draws
    # when the mstd noise reaches 10.
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    try:
        ImageOps.posterize(image, 0)
        pillow_rejects_zero_bits = False
    except ValueError:
        pillow_rejects_zero_bits = True
    if pillow_rejects_zero_bits:
        with pytest.raises(ValueError):
            op(image)
    else:  # older Pillow: black, the meaning the guard keeps
        assert not np.asarray(op(image)).any()
    guarded = lk_data.guard_posterize(transforms.Compose([auto_augment.RandAugment([op], 1)]))
    assert not np.asarray(guarded(image)).any()
    # Only the transform's own op changed: timm's table, used by everyone else, is untouched.
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is auto_augment.posterize
    assert AugmentOp("PosterizeIncreasing").aug_fn is auto_augment.posterize


# --- bad data -------------------------------------------------------------------------------


def write_image(path, seed):
    """A small random image, saved in the format its suffix names."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def image_folder(root, classes=("cat", "dog"), per_class=4):
    """root/<class>/0.png, 1.jpg, 2.png, ..."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}.{'jpg' if i % 2 else 'png'}", seed=100 * c + i)
    return root


def truncated_jpeg(path):
    buffer = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def text_as_jpeg(path):
    path.write_text("this is a text file, not an image\n")
    return path


def folders(tmp_path, train_classes=("cat", "dog"), eval_classes=("cat", "dog")):
    train = image_folder(tmp_path / "train", train_classes)
    val = image_folder(tmp_path / "val", eval_classes, per_class=2)
    return train, val


def data_flags(train, val):
    return ["--data_path", str(train), "--eval_data_path", str(val)]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_truncated_training_image_stops_with_one_line_naming_it(capsys, tmp_path, workers):
    train, val = folders(tmp_path)
    bad = truncated_jpeg(train / "dog" / "broken.JPEG")
    msg = cli_error(TINY + data_flags(train, val) + ["--num_workers", workers], capsys)
    assert msg.startswith(f"error: cannot decode {bad}: image file is truncated")
    assert msg.endswith("; pass --skip_bad_images true to skip such files")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_text_file_in_the_eval_set_stops_with_one_line_naming_it(capsys, tmp_path, workers):
    train, val = folders(tmp_path)
    bad = text_as_jpeg(val / "cat" / "notes.JPEG")
    msg = cli_error(TINY + data_flags(train, val) + ["--num_workers", workers], capsys)
    assert msg == (f"error: cannot decode {bad}: not an image in a format PIL reads; "
                   "pass --skip_bad_images true to skip such files")


def test_an_image_going_bad_in_a_later_epoch_keeps_the_checkpoints(capsys, tmp_path,
                                                                    monkeypatch):
    train, val = folders(tmp_path)
    out = tmp_path / "run"
    # Replaced in place as epoch 1 starts, so the 8 images still make full batches and the
    # truncated one is loaded (by a worker process started for that epoch).
    bad = train / "cat" / "0.png"
    real_train = lk_main.train_one_epoch

    def damage_then_train(*args, **kwargs):
        if args[5] == 1:
            truncated_jpeg(bad)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(lk_main, "train_one_epoch", damage_then_train)
    msg = cli_error(TINY + data_flags(train, val) + ["--output_dir", str(out), "--epochs", "2",
                                                     "--num_workers", "2"], capsys)
    assert msg.startswith(f"error: cannot decode {bad}: image file is truncated")
    ckpt = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0
    assert not (out / "checkpoint-1.pth").exists()
    assert '"epoch": 0' in (out / "log.txt").read_text()


def test_worker_wrapped_message_is_reduced_to_the_original_line():
    from torch._utils import ExceptionWrapper

    try:
        lk_data.load_rgb("/nonexistent/x.png")
    except lk_data.UndecodableImageError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(lk_data.UndecodableImageError) as err:
        wrapper.reraise()
    assert str(err.value) == ("cannot decode /nonexistent/x.png: [Errno 2] No such file or "
                              "directory: '/nonexistent/x.png'; pass --skip_bad_images true to "
                              "skip such files")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_skip_bad_images_names_and_counts_them(capfd, tmp_path, workers):
    # capfd: the warnings of worker processes go to the file descriptor, past capsys.
    train, val = folders(tmp_path)
    bad_train = [truncated_jpeg(train / "cat" / "4.jpeg"), text_as_jpeg(train / "dog" / "x.jpg")]
    bad_val = text_as_jpeg(val / "dog" / "y.jpg")
    # 12 training images, 3 full batches of 4: every index is loaded once in the epoch (with a
    # partial last batch, dropped by drop_last, a bad file could go unvisited).
    write_image(train / "cat" / "5.png", seed=7)
    write_image(train / "dog" / "5.png", seed=8)
    argv = TINY + data_flags(train, val) + ["--num_workers", workers, "--skip_bad_images", "true"]
    assert lk_main.cli(argv) == 0
    out = capfd.readouterr().out
    for bad in bad_train + [bad_val]:
        assert out.count(f"WARNING: skipping undecodable image {bad}: ") == 1, out
    assert "Skipped 2 undecodable images in epoch 0 (train)" in out
    assert "Skipped 1 undecodable image in epoch 0 (eval)" in out
    assert "12 training images" in out
    assert "(4 images)" in out  # eval scores the 4 decodable images once each, no stand-in


def test_evaluation_counts_stand_ins_nowhere():
    import engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    images, targets = torch.randn(10, 3, 2, 2), torch.randint(0, 6, (10,))
    with_stand_ins = targets.clone()
    with_stand_ins[[2, 7]] = lk_data.IGNORED_TARGET
    keep = with_stand_ins != lk_data.IGNORED_TARGET
    mixed = engine.evaluate([(images[:5], with_stand_ins[:5]), (images[5:], with_stand_ins[5:])],
                            model, torch.device("cpu"))
    clean = engine.evaluate([(images[keep], targets[keep])], model, torch.device("cpu"))
    assert mixed == pytest.approx(clean, rel=1e-6)  # float32 sums in another order
    assert clean["acc1"] not in (0.0, 100.0) or clean["loss"] > 0


def test_skipped_images_are_replaced_deterministically(tmp_path, capsys):
    root = image_folder(tmp_path / "train", per_class=2)
    bad = truncated_jpeg(root / "cat" / "1b.jpg")  # sorts between cat/1.jpg and dog/0.png
    args = lk_main.get_args_parser().parse_args(
        ["--input_size", "32", "--data_set", "image_folder", "--data_path", str(root),
         "--disable_eval", "true", "--skip_bad_images", "true"])
    dataset, nb_classes = lk_data.build_dataset(True, args)
    assert nb_classes == 2 and len(dataset) == 5
    seeded = lk_main.EpochSeededDataset(dataset, seed=0)
    image, label = seeded[2]  # the truncated file: dog/0.png (index 3) in its place
    again, _ = seeded[2]
    assert torch.equal(image, again) and label == 1
    assert dataset.take_skipped() == 2 and dataset.take_skipped() == 0
    assert capsys.readouterr().out.count(f"WARNING: skipping undecodable image {bad}") == 2


def test_skip_bad_images_with_no_decodable_image_stops(tmp_path):
    root = tmp_path / "train"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        text_as_jpeg(root / name / "a.jpg")
    args = lk_main.get_args_parser().parse_args(
        ["--data_set", "image_folder", "--data_path", str(root), "--disable_eval", "true",
         "--skip_bad_images", "true"])
    dataset, _ = lk_data.build_dataset(True, args)
    with pytest.raises(lk_data.UndecodableImageError, match="none of the 2 images of the train"):
        dataset[0]


def test_image_folder_without_eval_data_path(capsys, tmp_path):
    train, _ = folders(tmp_path)
    msg = cli_error(TINY + ["--data_path", str(train)], capsys)
    assert msg == ("error: --data_set image_folder evaluates on --eval_data_path, which is not "
                   "set: pass --eval_data_path DIR (or --disable_eval true to train without "
                   "evaluating)")
    # With --eval too (checked at the dataset: main.py wants weights to evaluate first).
    args = lk_main.get_args_parser().parse_args(
        ["--data_set", "image_folder", "--data_path", str(train), "--eval", "true"])
    with pytest.raises(lk_data.UserError) as err:
        lk_data.build_dataset(False, args)
    assert str(err.value) == ("--data_set image_folder evaluates on --eval_data_path, which is "
                              "not set: pass --eval_data_path DIR")
    assert lk_main.cli(TINY + ["--data_path", str(train), "--disable_eval", "true"]) == 0
    assert "Accuracy" not in capsys.readouterr().out


def test_single_class_dataset(capsys, tmp_path):
    train, val = folders(tmp_path, train_classes=("cat",))
    msg = cli_error(TINY + data_flags(train, val), capsys)
    assert msg == (f"error: the train data {train} has a single class folder (cat); a classifier "
                   f"needs at least two ({train}/<class>/<image>)")


def test_empty_class_folder_is_named(capsys, tmp_path):
    train, val = folders(tmp_path, train_classes=("cat", "dog"))
    (train / "emu").mkdir()
    (train / "emu" / "README.txt").write_text("not an image extension\n")
    write_image(val / "emu" / "0.png", seed=9)
    msg = cli_error(TINY + data_flags(train, val), capsys)
    assert msg.startswith(f"error: no images found in class folder {train / 'emu'} "
                          "(accepted extensions: .jpg, .jpeg, .png")


def test_train_and_eval_class_names_must_agree(capsys, tmp_path, monkeypatch):
    train, val = folders(tmp_path, train_classes=("cat", "dog"), eval_classes=("cat", "fox"))

    def no_scan(*args, **kwargs):
        raise AssertionError("folders scanned before the class names were compared")

    monkeypatch.setattr(lk_data.datasets, "ImageFolder", no_scan)
    msg = cli_error(TINY + data_flags(train, val), capsys)
    assert msg == (f"error: the class folders of the train data {train} and the eval data {val} "
                   "differ: only in train: dog; only in eval: fox (both need the same class "
                   "names)")


def test_nb_classes_mismatch_names_the_folder_and_classes(capsys, tmp_path):
    train, val = folders(tmp_path)
    msg = cli_error(TINY + data_flags(train, val) + ["--nb_classes", "3"], capsys)
    assert msg == (f"error: --nb_classes 3 does not match the 2 classes of the train data in "
                   f"{train} (image_folder: cat, dog)")


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_labels_outside_the_classes_are_rejected(capsys, tmp_path):
    images = np.zeros((8, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 12, 5, 6, 7])
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels)
    msg = cli_error(TINY + ["--data_set", "fashion_mnist", "--data_path", str(tmp_path)], capsys)
    assert msg == (f"error: the train labels in {tmp_path / 'train-labels-idx1-ubyte'} include "
                   "12, outside the 10 classes 0..9 of fashion_mnist")
