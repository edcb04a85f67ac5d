"""UniRepLKNet for audio classification (the paper's audio setting, an AST-style recipe).

A log-mel fbank (B, T, F) is read as a 1-channel image with frequency as height and time as
width, (B, 1, F, T); the backbone's pooled, normalised features go through a LayerNorm and a
linear classifier, the head AST puts on its encoder. Upstream builds the backbone with its
1000-way ImageNet head still attached, which does not fit that LayerNorm; here the backbone is
built without a classifier (``num_classes=0``) and its pre-logits features feed the head.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from modalities.audio import WaveformFrontEnd

from .convnext import _init_weights
from .registry import create_model

__all__ = ["UniRepLKNetAudio", "create_audio_classifier"]


class UniRepLKNetAudio(nn.Module):
    """An image backbone (``in_chans=1``, no classifier) + LayerNorm + Linear over fbanks.

    ``forward`` takes a (B, T, F) fbank, or with a ``frontend`` also raw (B, samples)
    waveforms, which the front end turns into fbanks first. The backbone needs
    ``forward_features`` / ``forward_head(pre_logits=True)`` and ``num_features``, as every
    lknets classification model has.
    """

    def __init__(self, backbone: nn.Module, num_classes: int,
                 frontend: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.frontend = frontend
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_features = backbone.num_features
        self.head_norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        _init_weights(self.head)

    @staticmethod
    def fbank_to_image(fbank: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, 1, F, T): frequency along the height, time along the width."""
        return fbank.unsqueeze(1).transpose(2, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Fbank or waveform batch -> pooled backbone features (B, num_features)."""
        if x.ndim == 2 and self.frontend is not None:
            x = self.frontend(x)
        elif x.ndim != 3:
            accepted = "(B, T, F) fbank or (B, samples) waveform" if self.frontend is not None \
                else "(B, T, F) fbank (a (B, samples) waveform needs a front end)"
            raise ValueError(f"{type(self).__name__} expected a {accepted}, got shape "
                             f"{tuple(x.shape)}")
        features = self.backbone.forward_features(self.fbank_to_image(x))
        return self.backbone.forward_head(features, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.forward_features(x)))


def create_audio_classifier(backbone: str, num_classes: int, waveform_input: bool = False,
                            target_length: int = 128, **backbone_kwargs: Any) -> nn.Module:
    """A registered model (e.g. ``unireplknet_s``, upstream's choice) as a 1-channel backbone
    under the audio head. ``waveform_input`` adds a ``WaveformFrontEnd`` producing
    ``target_length`` frames of 128 mel bins from 16 kHz audio; ``backbone_kwargs`` go to the
    backbone's constructor (``drop_path_rate``: upstream trains with 0.4)."""
    net = create_model(backbone, in_chans=1, num_classes=0, **backbone_kwargs)
    frontend = WaveformFrontEnd(target_length=target_length) if waveform_input else None
    return UniRepLKNetAudio(net, num_classes, frontend)
