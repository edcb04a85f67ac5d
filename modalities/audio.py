"""Audio as a 1-channel image: WAV reading, a Kaldi-compatible log-mel filterbank, SpecAugment
and a Speech Commands folder dataset, for UniRepLKNet's audio recipe (an AST-style pipeline).

The front end follows Kaldi's ``compute-fbank`` with the settings AST passes to it: 25 ms
frames every 10 ms (frames that would run past the end are dropped, Kaldi's ``snip_edges``),
no dither, per-frame DC removal, pre-emphasis 0.97, a symmetric Hann window, the power
spectrum of an FFT padded to the next power of two, triangular mel filters (mel = 1127
ln(1 + f / 700)) from 20 Hz to Nyquist, and the log with a floor. Waveforms are scaled to
[-1, 1] before it, as torch audio loaders give them, which is the scale the Speech Commands
normalisation statistics (``SPEECH_COMMANDS_MEAN``/``STD``) were measured on.

AST also subtracts each clip's mean before the fbank; with per-frame DC removal (and no
dither) that changes no output value, so it is not repeated here.

Everything runs on torch and numpy (torchaudio is not a dependency).
"""
from __future__ import annotations

import argparse
import functools
import os
import wave
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from utils import UserError

__all__ = ["SAMPLE_RATE", "SPEECH_COMMANDS_MEAN", "SPEECH_COMMANDS_STD", "read_wav",
           "kaldi_fbank", "pad_or_crop", "normalize_fbank", "SpecAugment", "WaveformFrontEnd",
           "SpeechCommandsFolder", "build_audio_dataset"]

SAMPLE_RATE = 16000
# Mean and std of the log-mel features over Speech Commands V2 (AST's recipe).
SPEECH_COMMANDS_MEAN = -6.845978
SPEECH_COMMANDS_STD = 5.5654526

_PREEMPHASIS = 0.97
_LOW_FREQ = 20.0
# Kaldi floors the mel energies at float32's machine epsilon before the log, whatever dtype the
# computation runs in, so silent frames give log(eps) = -15.94 rather than -inf.
_LOG_FLOOR = float(np.finfo(np.float32).eps)
_VALIDATION_LIST = "validation_list.txt"
_TESTING_LIST = "testing_list.txt"
_LAYOUT = (f"root/<class>/*.wav with {_VALIDATION_LIST} and/or {_TESTING_LIST} at the root, or "
           f"root/train/<class>/*.wav and root/val/<class>/*.wav")


def read_wav(path: str) -> Tuple[torch.Tensor, int]:
    """A 16-bit PCM WAV file as a float32 tensor of shape (samples,) in [-1, 1], and its rate.

    Samples are divided by 32768, the scaling torch audio loaders use. Files with several
    channels are averaged to one, since the models take a single channel.
    """
    try:
        with wave.open(path, "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            data = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as err:
        # wave raises a bare EOFError on a file shorter than a WAV header.
        detail = str(err) or "too short for a WAV header"
        raise UserError(f"{path} is not a readable WAV file ({detail}); accepted: 16-bit "
                        f"PCM WAV") from err
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}; accepted: 16-bit PCM "
                        f"WAV") from err
    if width != 2:
        raise UserError(f"{path} has {8 * width}-bit samples; accepted: 16-bit PCM WAV")
    # A truncated data chunk can end mid-frame; keep whole frames only.
    usable = len(data) - len(data) % (2 * channels)
    samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return torch.from_numpy(samples), rate


def _ms_to_samples(ms: float, sample_rate: int) -> int:
    # Kaldi truncates; the small tolerance keeps e.g. 25 ms at 16 kHz at 400 samples even when
    # the float product lands just below the integer.
    return int(sample_rate * ms / 1000.0 + 1e-6)


def _mel(freq: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(freq / 700.0)


@functools.lru_cache(maxsize=16)
def _mel_weights(num_mel_bins: int, padded_length: int, sample_rate: int) -> np.ndarray:
    """(num_mel_bins, padded_length // 2) triangular filters, equally spaced in mel between
    20 Hz and Nyquist, each rising from its left neighbour's centre to its own and falling to
    its right neighbour's. Kaldi leaves the Nyquist FFT bin out of every filter, hence
    ``padded_length // 2`` columns rather than the ``+ 1`` of a full one-sided spectrum."""
    nyquist = sample_rate / 2.0
    if not 0 < _LOW_FREQ < nyquist:
        raise ValueError(f"sample_rate {sample_rate} puts Nyquist at or below the 20 Hz low edge "
                         f"of the mel filters; pass a rate above 40 Hz")
    mel_low, mel_high = _mel(np.float64(_LOW_FREQ)), _mel(np.float64(nyquist))
    step = (mel_high - mel_low) / (num_mel_bins + 1)
    edges = mel_low + step * np.arange(num_mel_bins + 2)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fft_mel = _mel(np.arange(padded_length // 2) * sample_rate / padded_length)[None, :]
    rising = (fft_mel - left) / (centre - left)
    falling = (right - fft_mel) / (right - centre)
    inside = (fft_mel > left) & (fft_mel < right)
    weights = np.where(inside, np.where(fft_mel <= centre, rising, falling), 0.0)
    # With AST's 128 bins at 16 kHz a few of the lowest filters are narrower than the FFT bin
    # spacing and contain no bin. Kaldi's own binary refuses such settings; AST's fbank (and so
    # this one) keeps them, and those bands read the log floor in every frame.
    weights.setflags(write=False)
    return weights


def _frame_sizes(sample_rate: int, frame_length_ms: float,
                 frame_shift_ms: float) -> Tuple[int, int, int]:
    """Frame length, frame shift and padded FFT length in samples."""
    length = _ms_to_samples(frame_length_ms, sample_rate)
    shift = _ms_to_samples(frame_shift_ms, sample_rate)
    if length < 2 or shift < 1:
        raise ValueError(f"frame_length_ms={frame_length_ms} / frame_shift_ms={frame_shift_ms} "
                         f"give {length} / {shift} samples at {sample_rate} Hz; they need at "
                         f"least 2 / 1")
    return length, shift, 1 << (length - 1).bit_length()


def _log_mel(waveforms: torch.Tensor, window: torch.Tensor, weights: torch.Tensor,
             length: int, shift: int, padded: int) -> torch.Tensor:
    """(B, samples) -> (B, frames, num_mel_bins) log-mel energies, Kaldi's per-frame steps."""
    if waveforms.shape[-1] < length:
        raise ValueError(f"a waveform of {waveforms.shape[-1]} samples is shorter than one "
                         f"frame ({length} samples); pad it to at least {length} samples")
    frames = waveforms.unfold(-1, length, shift)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    # Pre-emphasis; Kaldi treats the sample before a frame's first as that first sample.
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - _PREEMPHASIS * previous) * window
    power = torch.fft.rfft(frames, n=padded).abs().pow(2)[..., :padded // 2]
    return (power @ weights.T).clamp_min(_LOG_FLOOR).log()


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> torch.Tensor:
    """Kaldi-compatible log-mel filterbank of a (samples,) waveform: (frames, num_mel_bins).

    frames = 1 + (samples - frame_length) // frame_shift. Computed in float64 for a float64
    waveform, else in float32; a waveform shorter than one frame is a ValueError.
    """
    if waveform.ndim != 1:
        raise ValueError(f"kaldi_fbank takes a (samples,) waveform, got shape "
                         f"{tuple(waveform.shape)}")
    if waveform.dtype != torch.float64:
        waveform = waveform.float()
    length, shift, padded = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    window = torch.hann_window(length, periodic=False, dtype=waveform.dtype,
                               device=waveform.device)
    weights = torch.tensor(_mel_weights(num_mel_bins, padded, sample_rate),
                           dtype=waveform.dtype, device=waveform.device)
    return _log_mel(waveform[None], window, weights, length, shift, padded)[0]


def pad_or_crop(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad at the end, or keep the first ``target_length`` frames, along the time axis
    (dim -2) of a (..., frames, bins) fbank. Padding happens before normalisation, so padded
    frames read as log-energy 0, as in AST."""
    frames = fbank.shape[-2]
    if frames >= target_length:
        return fbank[..., :target_length, :]
    return nn.functional.pad(fbank, (0, 0, 0, target_length - frames))


def normalize_fbank(fbank: torch.Tensor, mean: float = SPEECH_COMMANDS_MEAN,
                    std: float = SPEECH_COMMANDS_STD) -> torch.Tensor:
    """(fbank - mean) / (2 std): AST's normalisation, which leaves the features with a standard
    deviation of 0.5 over the dataset the statistics come from."""
    return (fbank - mean) / (2.0 * std)


class SpecAugment(nn.Module):
    """One frequency mask and one time mask on a (frames, bins) fbank (SpecAugment without
    time warping, as AST trains).

    Each mask has a width drawn uniformly from 0 .. ``mask - 1`` (at most the axis length) and
    a uniformly drawn start such that it fits, and sets its band to ``value``. AST masks the
    log-mel fbank before normalising it, with value 0. ``generator`` makes the draws
    reproducible; leave it None in DataLoader workers, whose global generators torch seeds
    differently per worker (a shared generator would repeat the same masks in every worker).
    """

    def __init__(self, freq_mask: int = 48, time_mask: int = 48, value: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if freq_mask < 0 or time_mask < 0:
            raise ValueError(f"SpecAugment mask widths must be >= 0, got freq_mask={freq_mask}, "
                             f"time_mask={time_mask}")
        self.freq_mask, self.time_mask, self.value = freq_mask, time_mask, value
        self.generator = generator

    def _band(self, size: int, max_width: int) -> Tuple[int, int]:
        if max_width == 0 or size == 0:
            return 0, 0
        width = int(torch.randint(min(max_width, size + 1), (), generator=self.generator))
        start = int(torch.randint(size - width + 1, (), generator=self.generator))
        return start, start + width

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        if fbank.ndim != 2:
            raise ValueError(f"SpecAugment takes one (frames, bins) fbank, got shape "
                             f"{tuple(fbank.shape)}")
        fbank = fbank.clone()
        f0, f1 = self._band(fbank.shape[1], self.freq_mask)
        t0, t1 = self._band(fbank.shape[0], self.time_mask)
        fbank[:, f0:f1] = self.value
        fbank[t0:t1, :] = self.value
        return fbank

    def extra_repr(self) -> str:
        return f"freq_mask={self.freq_mask}, time_mask={self.time_mask}, value={self.value}"


class WaveformFrontEnd(nn.Module):
    """Raw waveforms (B, samples) -> normalised fbanks (B, target_length, num_mel_bins), the
    dataset's deterministic preprocessing as a module, so a model can take audio directly.

    Window and mel filters are non-persistent buffers: they follow ``.to(device)`` but stay
    out of checkpoints. The features are computed in float32 even under autocast, since a
    half-precision FFT and log lose the quiet bands.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 128,
                 target_length: int = 128, mean: float = SPEECH_COMMANDS_MEAN,
                 std: float = SPEECH_COMMANDS_STD, frame_length_ms: float = 25.0,
                 frame_shift_ms: float = 10.0) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.target_length = target_length
        self.mean, self.std = mean, std
        self.frame_length, self.frame_shift, self.padded_length = _frame_sizes(
            sample_rate, frame_length_ms, frame_shift_ms)
        self.register_buffer("window", torch.hann_window(self.frame_length, periodic=False),
                             persistent=False)
        self.register_buffer("mel_weights", torch.tensor(
            _mel_weights(num_mel_bins, self.padded_length, sample_rate), dtype=torch.float32),
            persistent=False)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if waveforms.ndim != 2:
            raise ValueError(f"WaveformFrontEnd takes (B, samples) waveforms, got shape "
                             f"{tuple(waveforms.shape)}")
        with torch.autocast(waveforms.device.type, enabled=False):
            # .float() on the buffers too: a model cast with .half() casts them as well.
            fbank = _log_mel(waveforms.float(), self.window.float(), self.mel_weights.float(),
                             self.frame_length, self.frame_shift, self.padded_length)
            return normalize_fbank(pad_or_crop(fbank, self.target_length), self.mean, self.std)

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, num_mel_bins={self.num_mel_bins}, "
                f"target_length={self.target_length}")


def _wavs_in(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(".wav")
                  and os.path.isfile(os.path.join(folder, n)))


def _class_dirs(folder: str) -> List[str]:
    # Speech Commands keeps background noise in _background_noise_, which is not a class.
    return sorted(n for n in os.listdir(folder)
                  if not n.startswith("_") and os.path.isdir(os.path.join(folder, n)))


def _read_list(path: str) -> List[str]:
    with open(path) as f:
        return [os.path.normpath(line.strip()) for line in f if line.strip()]


class SpeechCommandsFolder(Dataset):
    """Keyword-spotting clips in Speech Commands' layout, as (fbank, label) items.

    Layouts (classes are the sorted folder names; folders starting with '_' are skipped):

    - ``root/<class>/*.wav`` with ``validation_list.txt`` and/or ``testing_list.txt`` at the
      root, each naming held-out files by path relative to root (``<class>/<file>.wav``):
      training uses every file in neither list, evaluation the validation list (the testing
      list when there is no validation list).
    - otherwise ``root/train/<class>/*.wav`` and ``root/val/<class>/*.wav``; classes come from
      ``train`` so both splits number them alike.

    An item is a float32 (target_length, num_mel_bins) normalised fbank and the int label
    (collated to int64). Training items get SpecAugment on the log-mel fbank before
    normalisation, as AST does; ``freq_mask=time_mask=0`` turns it off. Files must be 16 kHz.
    """

    def __init__(self, root: str, is_train: bool, target_length: int = 128,
                 num_mel_bins: int = 128, freq_mask: int = 48, time_mask: int = 48,
                 mean: float = SPEECH_COMMANDS_MEAN, std: float = SPEECH_COMMANDS_STD) -> None:
        if not os.path.isdir(root):
            raise UserError(f"audio data path {root} does not exist or is not a directory; "
                            f"expected {_LAYOUT}")
        self.root, self.is_train = root, is_train
        self.target_length, self.num_mel_bins = target_length, num_mel_bins
        self.mean, self.std = mean, std
        lists = [os.path.join(root, n) for n in (_VALIDATION_LIST, _TESTING_LIST)
                 if os.path.isfile(os.path.join(root, n))]
        if lists:
            self.classes = _class_dirs(root)
            relative = self._listed_split(lists)
        else:
            split_root = os.path.join(root, "train" if is_train else "val")
            train_root = os.path.join(root, "train")
            if not os.path.isdir(split_root):
                raise UserError(f"{root} has neither {_VALIDATION_LIST}/{_TESTING_LIST} nor a "
                                f"{os.path.basename(split_root)}/ folder; expected {_LAYOUT}")
            self.classes = _class_dirs(train_root) if os.path.isdir(train_root) else []
            extra = sorted(set(_class_dirs(split_root)) - set(self.classes))
            if extra:
                raise UserError(f"{split_root} has class folders not in {train_root}: "
                                f"{', '.join(extra)}; both splits need the same classes")
            relative = [os.path.join(os.path.basename(split_root), c, n)
                        for c in self.classes if os.path.isdir(os.path.join(split_root, c))
                        for n in _wavs_in(os.path.join(split_root, c))]
        index = {c: i for i, c in enumerate(self.classes)}
        # The class is the folder just above each file, in either layout.
        self.samples = [(os.path.join(root, r), index[os.path.basename(os.path.dirname(r))])
                        for r in relative]
        if not self.samples:
            raise UserError(f"no .wav files for the {'train' if is_train else 'eval'} split "
                            f"under {root}; expected {_LAYOUT}")
        self.targets = [label for _, label in self.samples]
        self.num_classes = len(self.classes)
        self.spec_augment = SpecAugment(freq_mask, time_mask) if is_train else None

    def _listed_split(self, lists: List[str]) -> List[str]:
        """Relative paths of this split when held-out lists exist (``lists``: their paths)."""
        files = [os.path.join(c, n) for c in self.classes
                 for n in _wavs_in(os.path.join(self.root, c))]
        known = set(files)
        held_out = {}
        for path in lists:
            entries = _read_list(path)
            missing = [e for e in entries if e not in known]
            if missing:
                raise UserError(f"{path} names {missing[0]}, which is not a .wav file in a class "
                                f"folder of {self.root} ({len(missing)} such entries); entries "
                                f"are paths relative to the root, <class>/<file>.wav")
            held_out[path] = entries
        if self.is_train:
            excluded = set().union(*held_out.values())
            return [f for f in files if f not in excluded]
        return held_out[lists[0]]  # the validation list when present, else the testing list

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        waveform, rate = read_wav(path)
        if rate != SAMPLE_RATE:
            raise UserError(f"{path} is sampled at {rate} Hz; accepted: {SAMPLE_RATE} Hz "
                            f"(resample the dataset first)")
        try:
            fbank = kaldi_fbank(waveform, rate, self.num_mel_bins)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from err
        fbank = pad_or_crop(fbank, self.target_length)
        if self.spec_augment is not None:
            fbank = self.spec_augment(fbank)
        return normalize_fbank(fbank, self.mean, self.std), label


def build_audio_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """The train or eval split of the Speech Commands folder ``args.data_path``, with
    ``args.input_size`` as the number of frames (128 in the upstream recipe: 1.28 s), and its
    number of classes. SpecAugment widths come from ``args.freqm`` / ``args.timem`` when the
    command line has them (AST's flag names), else 48 and 48."""
    if not args.data_path:
        raise UserError(f"audio training needs --data_path, a folder laid out as {_LAYOUT}")
    if args.input_size < 1:
        raise UserError(f"--input_size is the number of fbank frames for audio; got "
                        f"{args.input_size}, accepted: a positive integer (128 for 1.28 s)")
    dataset = SpeechCommandsFolder(args.data_path, is_train, target_length=args.input_size,
                                   freq_mask=getattr(args, "freqm", 48),
                                   time_mask=getattr(args, "timem", 48))
    return dataset, dataset.num_classes
