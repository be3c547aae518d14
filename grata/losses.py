"""The two GraTa losses and the teacher views, shared by the methods and the export."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ENTROPY_EPS = 1e-6

# (forward, inverse) pairs on [N,C,H,W]: identity, h-flip, v-flip, rot 90/180/270.
VIEWS = (
    (lambda t: t, lambda t: t),
    (lambda t: t.flip(3), lambda t: t.flip(3)),
    (lambda t: t.flip(2), lambda t: t.flip(2)),
    (lambda t: torch.rot90(t, 1, (2, 3)), lambda t: torch.rot90(t, -1, (2, 3))),
    (lambda t: torch.rot90(t, 2, (2, 3)), lambda t: torch.rot90(t, -2, (2, 3))),
    (lambda t: torch.rot90(t, 3, (2, 3)), lambda t: torch.rot90(t, -3, (2, 3))),
)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of -sum_c p log(p + 1e-6), p = sigmoid(logits) (p log p term only)."""
    p = torch.sigmoid(logits)
    return -(p * torch.log(p + ENTROPY_EPS)).sum(1).mean()


def teacher_batch(x: torch.Tensor) -> torch.Tensor:
    """The 6 teacher views of a batch-1 image as one batch [6,C,S,S]."""
    return torch.cat([fwd(x) for fwd, _ in VIEWS], 0)


def teacher_target(view_logits: torch.Tensor) -> torch.Tensor:
    """Mean of the 6 sigmoid maps, each mapped back by its inverse view: [1,2,S,S]."""
    maps = [inv(torch.sigmoid(view_logits[i:i + 1])) for i, (_, inv) in enumerate(VIEWS)]
    return torch.stack(maps, 0).mean(0)


def consistency_loss(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits between the student's logits and the soft teacher target (mean)."""
    return F.binary_cross_entropy_with_logits(student_logits, target)
