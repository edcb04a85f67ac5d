"""Knowledge-distillation losses for ``main_KD.py``: KD (Hinton et al.) and NKD (Yang et al.).

Notation: ``s``/``t`` are student/teacher logits of shape (N, C), ``T`` the temperature, ``y``
the label of each sample (with mixup/cutmix: the class of largest weight in its soft target).

* KD, as SLaK's ``engine_kd.py``::

      alpha * T^2 * mean_n KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets)

  With ``hard``: ``0.5 * CE(s, targets) + 0.5 * CE(s, argmax t)``.
* NKD, as its authors define it (yzd-v/cls_KD ``nkd.py``, added to the student's own CE)::

      CE(s, targets)
      - mean_n softmax(t)_y * log softmax(s)_y                                  (target term)
      - gamma * T^2 * mean_n sum_{k != y} softmax_{k != y}(t/T)_k * log softmax_{k != y}(s/T)_k

  where ``softmax_{k != y}`` is the softmax over the C - 1 non-target logits, i.e. the
  non-target probabilities renormalised to sum to 1.

``CE(s, targets)`` is main.py's criterion (soft-target CE under mixup, label smoothing
otherwise). The teacher runs under ``no_grad``: no gradient reaches it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import InputCriterion

__all__ = ["DISTILL_TYPES", "kd_loss", "nkd_loss", "hard_labels", "DistillationLoss"]

DISTILL_TYPES = ("KD", "NKD", "None")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            T: float = 1.0) -> torch.Tensor:
    """``T^2 * mean_n KL(softmax(t/T) || softmax(s/T))`` (T^2 keeps the gradient's scale
    independent of T)."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return T * T * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices: the targets themselves, or the dominant class of soft (mixup) targets."""
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             T: float = 1.0, gamma: float = 1.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """NKD's (target term, ``gamma * T^2 *`` non-target term) for class indices ``labels``.

    The target term is taken at temperature 1 and weighted by the teacher's confidence; the
    non-target term is a cross-entropy between the teacher's and the student's distributions
    over the other C - 1 classes, both at temperature ``T``.
    """
    s, t = student_logits.float(), teacher_logits.float()
    n, c = s.shape
    index = labels.view(n, 1)
    p_t_target = F.softmax(t, dim=1).gather(1, index)
    log_p_s_target = F.log_softmax(s, dim=1).gather(1, index)
    target = -(p_t_target * log_p_s_target).mean()
    # The other classes of each row, 0..C-2 shifted past the label (a gather, unlike a boolean
    # mask, needs no host sync for its size); their softmax is the renormalised distribution.
    others = torch.arange(c - 1, device=s.device).expand(n, c - 1)
    others = others + (others >= index).long()
    q_t = F.softmax(t.gather(1, others) / T, dim=1)
    log_q_s = F.log_softmax(s.gather(1, others) / T, dim=1)
    non_target = -gamma * T * T * (q_t * log_q_s).sum(dim=1).mean()
    return target, non_target


class DistillationLoss(InputCriterion):
    """The student's criterion plus KD or NKD from a teacher run on the same (mixed) batch.

    Returns the loss and its terms, each as it enters the sum: ``loss_ce`` and ``loss_kd``
    (KD), ``loss_ce`` and ``loss_hard`` (KD with ``hard``), or ``loss_ce``,
    ``loss_nkd_target`` and ``loss_nkd_nontarget`` (NKD).

    Args:
        teacher: the teacher, in eval mode; it is only ever called under ``no_grad``.
        base_criterion: the student's loss on the targets (main.py's criterion).
        distill_type: ``"KD"`` or ``"NKD"``.
        T: temperature of the KD term and of NKD's non-target term.
        alpha: KD's weight of the distillation term (the CE gets ``1 - alpha``).
        gamma: NKD's weight of the non-target term.
        hard: KD only: distil the teacher's argmax labels instead (upstream ``--hard``).
    """

    def __init__(self, teacher: nn.Module, base_criterion: nn.Module, distill_type: str,
                 T: float = 1.0, alpha: float = 0.1, gamma: float = 1.5,
                 hard: bool = False) -> None:
        if distill_type not in ("KD", "NKD"):
            raise ValueError(f"distill_type must be KD or NKD, got {distill_type!r}")
        if hard and distill_type != "KD":
            raise ValueError("hard applies to KD only")
        # A plain attribute, not a registered submodule: the criterion owns no parameters.
        self.teacher = teacher
        self.base_criterion = base_criterion
        self.distill_type = distill_type
        self.T, self.alpha, self.gamma, self.hard = T, alpha, gamma, hard

    def __call__(self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        ce = self.base_criterion(outputs, targets)
        if self.distill_type == "NKD":
            target, non_target = nkd_loss(outputs, teacher_logits, hard_labels(targets), self.T,
                                          self.gamma)
            terms = {"loss_ce": ce, "loss_nkd_target": target, "loss_nkd_nontarget": non_target}
        elif self.hard:
            terms = {"loss_ce": 0.5 * ce,
                     "loss_hard": 0.5 * F.cross_entropy(outputs, teacher_logits.argmax(dim=1))}
        else:
            terms = {"loss_ce": (1 - self.alpha) * ce,
                     "loss_kd": self.alpha * kd_loss(outputs, teacher_logits, self.T)}
        return sum(terms.values()), terms

    def __repr__(self) -> str:
        if self.distill_type == "NKD":
            how = f"NKD, T={self.T:g}, gamma={self.gamma:g}"
        elif self.hard:
            how = "KD, hard"
        else:
            how = f"KD, T={self.T:g}, alpha={self.alpha:g}"
        return (f"{type(self).__name__}({how}, teacher={type(self.teacher).__name__}, "
                f"base={self.base_criterion})")
