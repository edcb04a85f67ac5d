"""Audio: WAV reading, the Kaldi-style fbank against a plain numpy reference, SpecAugment, the
Speech Commands folder dataset, and the UniRepLKNet audio classifier (tiny sizes, CPU)."""
import argparse
import glob
import math
import os
import wave

import numpy as np
import pytest
import torch

from models.audio import UniRepLKNetAudio, create_audio_classifier
from modalities.audio import (SPEECH_COMMANDS_MEAN, SPEECH_COMMANDS_STD, SpecAugment,
                              SpeechCommandsFolder, WaveformFrontEnd, build_audio_dataset,
                              kaldi_fbank, normalize_fbank, pad_or_crop, read_wav)
from utils import UserError

SR = 16000
POCKETSPHINX = "/usr/share/pocketsphinx/test/data"
SPEECH = sorted(glob.glob(os.path.join(POCKETSPHINX, "cards", "*.wav")) +
                glob.glob(os.path.join(POCKETSPHINX, "librivox", "*.wav")))
needs_speech = pytest.mark.skipif(
    not SPEECH, reason=f"no recordings under {POCKETSPHINX} (Debian package "
                       f"pocketsphinx-testdata; the project's setup installs it)")
TONES = {"high": 2500.0, "low": 300.0, "mid": 900.0}  # class -> tone frequency (Hz)


def write_wav(path, samples, rate=SR, width=2, channels=1):
    """``samples``: float array in [-1, 1], (n,) or (n, channels); stored as PCM ints."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scale = {1: 127, 2: 32767}[width]
    ints = np.round(np.asarray(samples) * scale).astype({1: np.int8, 2: "<i2"}[width])
    if width == 1:
        ints = (ints.astype(np.int16) + 128).astype(np.uint8)  # 8-bit WAV is unsigned
    with wave.open(path, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(ints.tobytes())


def tone(freq, seconds=0.5, rate=SR, amplitude=0.5, phase=0.0):
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t + phase)


def tone_folder(root, per_class=3):
    """root/<class>/<class>_<i>.wav, tones varying a little in amplitude and phase, plus a
    _background_noise_ folder that must not become a class. Returns the relative paths."""
    rng = np.random.default_rng(0)
    paths = {}
    for name, freq in TONES.items():
        paths[name] = []
        for i in range(per_class):
            rel = os.path.join(name, f"{name}_{i}.wav")
            write_wav(os.path.join(root, rel), tone(freq, amplitude=0.3 + 0.1 * i,
                                                    phase=rng.uniform(0, 2 * np.pi)))
            paths[name].append(rel)
    write_wav(os.path.join(root, "_background_noise_", "noise.wav"), rng.uniform(-0.1, 0.1, SR))
    return paths


def write_list(path, entries):
    with open(path, "w") as f:
        f.write("".join(e + "\n" for e in entries))


# --------------------------------------------------------------------------- numpy reference

def mel(f):
    return 1127.0 * np.log(1.0 + f / 700.0)


def reference_fbank_frame(frame, rate, num_bins):
    """Kaldi's steps for one frame, written out: DC removal, pre-emphasis 0.97 (the first sample
    against itself), symmetric Hann window, power spectrum of a zero-padded FFT, triangular
    mel filters from 20 Hz to Nyquist over the FFT bins below Nyquist, log with a floor."""
    x = np.asarray(frame, dtype=np.float64)
    n = len(x)
    x = x - x.mean()
    emphasized = np.empty(n)
    emphasized[0] = x[0] - 0.97 * x[0]
    for i in range(1, n):
        emphasized[i] = x[i] - 0.97 * x[i - 1]
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (n - 1)) for i in range(n)])
    fft_size = 1
    while fft_size < n:
        fft_size *= 2
    power = np.abs(np.fft.fft(emphasized * window, fft_size)) ** 2
    low, high = mel(20.0), mel(rate / 2.0)
    step = (high - low) / (num_bins + 1)
    out = []
    for b in range(num_bins):
        left, centre, right = low + b * step, low + (b + 1) * step, low + (b + 2) * step
        energy = 0.0
        for k in range(fft_size // 2):
            m = mel(k * rate / fft_size)
            if left < m < right:
                if m <= centre:
                    weight = (m - left) / (centre - left)
                else:
                    weight = (right - m) / (right - centre)
                energy += weight * power[k]
        out.append(math.log(max(energy, np.finfo(np.float32).eps)))
    return np.array(out)


# --------------------------------------------------------------------------------- fbank

@pytest.mark.parametrize("samples", [400, 401, 559, 560, 561, 8000, 16000])
def test_fbank_frame_count(samples):
    fbank = kaldi_fbank(torch.randn(samples), SR)
    assert fbank.shape == (1 + (samples - 400) // 160, 128)
    # Other frame settings follow the same formula: 20 ms / 5 ms at 8 kHz is 160 / 40 samples.
    fbank = kaldi_fbank(torch.randn(samples), 8000, num_mel_bins=23, frame_length_ms=20.0,
                        frame_shift_ms=5.0)
    assert fbank.shape == (1 + (samples - 160) // 40, 23)


def test_fbank_too_short_raises():
    with pytest.raises(ValueError, match="shorter than one frame") as err:
        kaldi_fbank(torch.randn(399), SR)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("num_bins", [23, 128])
def test_fbank_matches_numpy_reference(num_bins):
    rng = np.random.default_rng(1)
    wav = rng.normal(0, 0.1, 1200) + 0.05  # with a DC offset for the per-frame removal to undo
    ours = kaldi_fbank(torch.from_numpy(wav), SR, num_mel_bins=num_bins).numpy()
    assert ours.shape == (6, num_bins)
    for index in (0, 4):  # the first frame, and one that starts mid-signal at 4 * 160
        expected = reference_fbank_frame(wav[index * 160: index * 160 + 400], SR, num_bins)
        np.testing.assert_allclose(ours[index], expected, rtol=0, atol=1e-8)
    # float32, the dtype the dataset uses, agrees to float32 accuracy.
    ours32 = kaldi_fbank(torch.from_numpy(wav).float(), SR, num_mel_bins=num_bins).numpy()
    np.testing.assert_allclose(ours32, ours, rtol=0, atol=2e-3)


def test_fbank_ignores_waveform_offset():
    """AST subtracts each clip's mean first; per-frame DC removal makes that a no-op."""
    wav = torch.from_numpy(tone(440.0)) + 0.01 * torch.randn(8000, dtype=torch.float64)
    torch.testing.assert_close(kaldi_fbank(wav + 0.2, SR), kaldi_fbank(wav, SR))


def test_tone_peaks_at_nearest_mel_bin():
    fbank = kaldi_fbank(torch.from_numpy(tone(1000.0)).float(), SR)
    low, high = mel(20.0), mel(8000.0)
    centres = low + (high - low) / 129 * np.arange(1, 129)
    nearest = int(np.abs(centres - mel(1000.0)).argmin())
    assert int(fbank.mean(0).argmax()) == nearest
    # Every frame of a steady tone peaks in the same place.
    assert (fbank.argmax(1) == nearest).all()


def test_pad_or_crop_and_normalize():
    fbank = torch.randn(5, 4)
    padded = pad_or_crop(fbank, 8)
    assert padded.shape == (8, 4) and torch.equal(padded[:5], fbank) and (padded[5:] == 0).all()
    assert torch.equal(pad_or_crop(fbank, 3), fbank[:3])
    assert torch.equal(pad_or_crop(fbank[None], 3), fbank[None, :3])  # batched: time is dim -2
    value = torch.tensor([SPEECH_COMMANDS_MEAN + 2 * SPEECH_COMMANDS_STD])
    torch.testing.assert_close(normalize_fbank(value), torch.tensor([1.0]))


# ------------------------------------------------------------------------------ WAV files

def test_read_wav_scaling_and_channels(tmp_path):
    path = str(tmp_path / "values.wav")
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes(np.array([-32768, 0, 16384, 32767], dtype="<i2").tobytes())
    samples, rate = read_wav(path)
    assert rate == SR and samples.dtype == torch.float32
    assert samples.tolist() == [-1.0, 0.0, 0.5, 32767 / 32768]
    stereo = str(tmp_path / "stereo.wav")
    left, right = tone(300.0, amplitude=0.4), tone(700.0, amplitude=0.2)
    write_wav(stereo, np.stack([left, right], axis=1), channels=2)
    samples, _ = read_wav(stereo)
    np.testing.assert_allclose(samples.numpy(), (left + right) / 2, atol=1 / 32768)


@pytest.mark.parametrize("kind", ["text", "8bit", "missing"])
def test_read_wav_rejects_bad_files(tmp_path, kind):
    path = str(tmp_path / "bad.wav")
    if kind == "text":
        with open(path, "w") as f:
            f.write("not audio\n")
    elif kind == "8bit":
        write_wav(path, tone(440.0), width=1)
    with pytest.raises(UserError) as err:
        read_wav(path)
    message = str(err.value)
    assert path in message and "16-bit PCM" in message and "\n" not in message


@needs_speech
def test_real_speech_recordings():
    for path in SPEECH:
        samples, rate = read_wav(path)
        with wave.open(path) as f:
            assert rate == f.getframerate() == SR
            assert samples.shape == (f.getnframes(),)
        assert samples.abs().max() <= 1.0
        fbank = kaldi_fbank(samples, rate)
        duration_frames = (len(samples) / rate - 0.025) / 0.010
        assert fbank.shape == (1 + int(duration_frames + 1e-9), 128)
        energy = fbank.mean(1).sort().values
        tenth = len(energy) // 10
        # Speech is far above the pauses: > e^3 = 20x the power per band on average.
        assert energy[-tenth:].mean() - energy[:tenth].mean() > 3.0
        # [-1, 1] scaling puts the features near the dataset mean (int16 scaling adds 20.8).
        assert -10.0 < fbank.mean() < -3.0


# ---------------------------------------------------------------------------- SpecAugment

def masked_bands(out, original):
    zero_cols = (out == 0).all(0) & (original != 0).any(0)
    zero_rows = (out == 0).all(1) & (original != 0).any(1)
    return torch.nonzero(zero_cols).flatten(), torch.nonzero(zero_rows).flatten()


def test_spec_augment_masks_within_limits():
    fbank = torch.rand(100, 128) + 1.0
    augment = SpecAugment(freq_mask=48, time_mask=30, generator=torch.Generator().manual_seed(0))
    widths = {"freq": [], "time": []}
    for _ in range(300):
        out = augment(fbank)
        cols, rows = masked_bands(out, fbank)
        for name, band, limit in (("freq", cols, 48), ("time", rows, 30)):
            if len(band):  # one contiguous band, narrower than the limit
                assert band[-1] - band[0] + 1 == len(band) < limit
            widths[name].append(len(band))
        # Nothing outside the two bands changed.
        keep = torch.ones_like(fbank, dtype=torch.bool)
        keep[:, cols] = False
        keep[rows, :] = False
        assert torch.equal(out[keep], fbank[keep])
    assert max(widths["freq"]) >= 40 and max(widths["time"]) >= 25
    assert np.mean(widths["freq"]) > 15 and np.mean(widths["time"]) > 10
    assert torch.equal(SpecAugment(0, 0)(fbank), fbank)


def test_spec_augment_reproducible():
    fbank = torch.rand(64, 32) + 1.0

    def run(seed):
        augment = SpecAugment(16, 16, generator=torch.Generator().manual_seed(seed))
        return torch.stack([augment(fbank) for _ in range(5)])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# ------------------------------------------------------------------------------- dataset

def test_dataset_with_list_files(tmp_path):
    root = str(tmp_path)
    paths = tone_folder(root)
    validation = [paths[c][0] for c in TONES]
    testing = [paths[c][1] for c in TONES]
    write_list(os.path.join(root, "validation_list.txt"), validation)
    write_list(os.path.join(root, "testing_list.txt"), testing)

    train = SpeechCommandsFolder(root, is_train=True, target_length=32)
    assert train.classes == sorted(TONES) and train.num_classes == 3
    assert sorted(os.path.relpath(p, root) for p, _ in train.samples) == \
        sorted(paths[c][2] for c in TONES)
    evaluation = SpeechCommandsFolder(root, is_train=False, target_length=32)
    assert sorted(os.path.relpath(p, root) for p, _ in evaluation.samples) == sorted(validation)
    assert train.spec_augment is not None and evaluation.spec_augment is None

    fbanks, labels = next(iter(torch.utils.data.DataLoader(evaluation, batch_size=3)))
    assert fbanks.shape == (3, 32, 128) and fbanks.dtype == torch.float32
    assert labels.dtype == torch.int64
    for (path, label), fbank, got in zip(evaluation.samples, fbanks, labels):
        assert evaluation.classes[label] == os.path.basename(os.path.dirname(path)) and got == label
        samples, _ = read_wav(path)
        expected = normalize_fbank(pad_or_crop(kaldi_fbank(samples, SR), 32))
        torch.testing.assert_close(fbank, expected)

    # Without a validation list, evaluation uses the testing list.
    os.remove(os.path.join(root, "validation_list.txt"))
    evaluation = SpeechCommandsFolder(root, is_train=False)
    assert sorted(os.path.relpath(p, root) for p, _ in evaluation.samples) == sorted(testing)
    assert len(SpeechCommandsFolder(root, is_train=True)) == 6


def test_dataset_with_train_val_folders(tmp_path):
    root = str(tmp_path)
    tone_folder(os.path.join(root, "train"), per_class=2)
    tone_folder(os.path.join(root, "val"), per_class=1)
    args = argparse.Namespace(data_path=root, input_size=40)
    train, num_classes = build_audio_dataset(True, args)
    evaluation, _ = build_audio_dataset(False, args)
    assert num_classes == 3 and len(train) == 6 and len(evaluation) == 3
    assert train.classes == evaluation.classes == sorted(TONES)
    assert train[0][0].shape == (40, 128)
    assert [label for _, label in evaluation.samples] == [0, 1, 2]


def test_dataset_user_errors(tmp_path):
    def error(is_train, data_path):
        with pytest.raises(UserError) as err:
            build_audio_dataset(is_train, argparse.Namespace(data_path=data_path, input_size=32))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "does not exist" in error(True, str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "train/" in error(True, str(empty))
    (empty / "train" / "yes").mkdir(parents=True)
    assert "no .wav files" in error(True, str(empty))

    root = tmp_path / "listed"
    tone_folder(str(root), per_class=1)
    write_list(str(root / "validation_list.txt"), ["low/nonexistent.wav"])
    message = error(False, str(root))
    assert str(root / "validation_list.txt") in message and "low/nonexistent.wav" in message


def test_dataset_wrong_sample_rate_names_file(tmp_path):
    root = tmp_path / "train"
    tone_folder(str(root), per_class=1)
    bad = str(root / "low" / "z_8k.wav")
    write_wav(bad, tone(300.0, rate=8000), rate=8000)
    dataset = SpeechCommandsFolder(str(tmp_path), is_train=True)
    index = [p for p, _ in dataset.samples].index(bad)
    with pytest.raises(UserError) as err:
        dataset[index]
    message = str(err.value)
    assert bad in message and "8000" in message and "16000" in message and "\n" not in message


# --------------------------------------------------------------------------------- model

def test_fbank_to_image_layout():
    x = torch.randn(2, 5, 7)  # (B, T, F)
    image = UniRepLKNetAudio.fbank_to_image(x)
    assert image.shape == (2, 1, 7, 5)
    for b in range(2):
        for f in range(7):
            for t in range(5):
                assert image[b, 0, f, t] == x[b, t, f]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_audio_classifier("unireplknet_a", num_classes=3, waveform_input=True,
                                   target_length=32)


def test_model_forward_backward_and_layout(tiny_model):
    model = tiny_model
    assert model.backbone.in_chans == 1 and model.num_features == 320
    seen = []
    hook = model.backbone.downsample_layers[0].register_forward_pre_hook(
        lambda _, args: seen.append(args[0]))
    x = torch.randn(2, 32, 128, requires_grad=True)
    try:
        logits = model(x)
    finally:
        hook.remove()
    assert logits.shape == (2, 3)
    # What the backbone received, element by element: [b, 0, f, t] == x[b, t, f].
    image = seen[0]
    assert image.shape == (2, 1, 128, 32)
    for b, f, t in [(0, 0, 0), (1, 127, 31), (0, 5, 17), (1, 100, 3)]:
        assert image[b, 0, f, t] == x[b, t, f]
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.head.weight.grad is not None
    assert model.backbone.downsample_layers[0][0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_model_waveform_input(tiny_model):
    model = tiny_model.eval()
    waveforms = torch.from_numpy(np.stack([tone(300.0), tone(2500.0)])).float()
    features = model.frontend(waveforms)
    assert features.shape == (2, 32, 128)
    for waveform, fbank in zip(waveforms, features):
        expected = normalize_fbank(pad_or_crop(kaldi_fbank(waveform, SR), 32))
        torch.testing.assert_close(fbank, expected)
    with torch.no_grad():
        logits = model(features)
        torch.testing.assert_close(model(waveforms), logits)
        # The head is LayerNorm + Linear over the backbone's pre-logits features.
        image = features.permute(0, 2, 1)[:, None]
        pooled = model.backbone.forward_head(model.backbone.forward_features(image),
                                             pre_logits=True)
        torch.testing.assert_close(logits, model.head(model.head_norm(pooled)))
        assert isinstance(model.head_norm, torch.nn.LayerNorm)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the front end stays in float32
        assert model.frontend(waveforms).dtype == torch.float32
    model.train()


def test_model_rejects_wrong_rank(tiny_model):
    with pytest.raises(ValueError, match=r"expected a \(B, T, F\) fbank or \(B, samples\)"):
        tiny_model(torch.randn(2, 1, 32, 128))
    fbank_only = UniRepLKNetAudio(tiny_model.backbone, 3)
    with pytest.raises(ValueError, match="needs a front end") as err:
        fbank_only(torch.randn(2, 8000))
    assert "\n" not in str(err.value)


def test_front_end_rejects_wrong_rank():
    with pytest.raises(ValueError, match="WaveformFrontEnd takes"):
        WaveformFrontEnd()(torch.randn(8000))


def test_training_on_tones_lowers_loss(tmp_path):
    root = str(tmp_path)
    tone_folder(os.path.join(root, "train"), per_class=2)
    dataset = SpeechCommandsFolder(root, is_train=True, target_length=32, freq_mask=0,
                                   time_mask=0)
    fbanks, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    torch.manual_seed(0)
    model = create_audio_classifier("unireplknet_a", num_classes=3)
    # A small lr: at 1e-3 the first steps overshoot (the loss rises before it falls).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(fbanks), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
