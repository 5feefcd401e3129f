"""Training losses: cross-entropy on labels, distillation on logits (images) and on embeddings
(sentence models)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...errors import UserInputError

def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy on labels (labels < 0, i.e. unknown, are ignored)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-1,
                           label_smoothing=label_smoothing)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      T: float = 1.0, alpha: float = 1.0,
                      labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Knowledge distillation (Hinton et al.): ``KL(softmax(t/T) || softmax(s/T)) * T**2``,
    averaged over the batch.

    With ``labels`` (and at least one known label, ``>= 0``) the result is
    ``alpha * KD + (1 - alpha) * CE(student, labels)``; without labels it is the KD term alone
    (``alpha`` is then ignored). The teacher is detached.
    """
    if T <= 0:
        raise UserInputError(f"temperature T must be > 0, got {T}")
    if not 0.0 <= alpha <= 1.0:
        raise UserInputError(f"alpha must be in [0, 1], got {alpha}")
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    kd = F.kl_div(s, t, reduction="batchmean", log_target=True) * (T * T)
    if labels is None or alpha >= 1.0 or not bool((labels >= 0).any()):
        return kd
    return alpha * kd + (1.0 - alpha) * cross_entropy(student_logits, labels)


# distillation of a sentence model: its embeddings against the float model's
EMBEDDING_LOSSES = ("cosine", "mse")
LOSSES = ("ce", "kd", "kd+ce") + EMBEDDING_LOSSES


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor,
                   kind: str = "cosine") -> torch.Tensor:
    """Distillation on embeddings ``(batch, dim)``: ``cosine`` is the mean of
    ``1 - cos(student, teacher)`` (what the sentence-fidelity scores measure; blind to the
    norm), ``mse`` the mean squared difference per element. The teacher is detached."""
    s, t = student.float(), teacher.detach().float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise UserInputError(f"embedding loss must be one of {EMBEDDING_LOSSES}, got {kind!r}")
