"""ORM training objectives (docs/method.md, "Step 5"): adding one is one entry in :data:`OBJECTIVES`, whose
name is the ``--rm_objective`` choice and the objective's piece of checkpoint and result file names.
Loaded without torch, so steps parse flags before importing it; the losses import torch when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def bt_loss(winner_scores: Tensor, loser_scores: Tensor) -> Tensor:
    """Bradley-Terry negative log-likelihood, mean of -log sigmoid(r_w - r_l)."""
    import torch.nn.functional as F

    return F.softplus(loser_scores - winner_scores).mean()


def clf_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Pointwise classification loss: BCE of sigmoid(score) against winner=1, loser=0."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits, labels)


@dataclass(frozen=True)
class Objective:
    """loss: (winner_scores, loser_scores) -> mean loss of a pairwise objective, fed each pair once;
    (scores, labels) -> mean loss of a pointwise one, fed the pairs' responses as independent
    samples labelled winner 1, loser 0."""

    help: str
    loss: Callable[[Tensor, Tensor], Tensor]
    pointwise: bool

    @property
    def responses_per_sample(self) -> int:
        return 1 if self.pointwise else 2

    def pair_loss(self, winner_scores: Tensor, loser_scores: Tensor) -> Tensor:
        """The objective's loss on pairs given both sides' (V,) scores (validation)."""
        if not self.pointwise:
            return self.loss(winner_scores, loser_scores)
        import torch

        return self.loss(
            torch.cat([winner_scores, loser_scores]),
            torch.cat([torch.ones_like(winner_scores), torch.zeros_like(loser_scores)]),
        )


# ORM early-stopping schemes (docs/method.md, "Early stopping and ensemble options"), step 5's
# --early_stopping choices; the first is its default. networks.py runs them.
EARLY_STOPPING = ("member", "pooled", "none")

OBJECTIVES = {
    "bt": Objective("-log sigmoid(r_w - r_l)", bt_loss, pointwise=False),
    "clf": Objective("pointwise BCE, winner 1, loser 0", clf_loss, pointwise=True),
}
