"""The causal-LM loss, defined once: training, pipeline stages and evaluation all compute it here.

Labels are the unshifted token ids with :data:`IGNORE` wherever no loss is wanted (prompt tokens,
padding); position ``t``'s logits predict label ``t + 1``. The one primitive is a sum of fp32
cross-entropies: the training loop turns sums into the token mean of a whole global batch (see
``toolkit.training.trainer``), evaluation divides the sum of a set by its token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # transformers' ignore label too, so labels built here work with its models' own loss


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of fp32 cross-entropies of ``logits`` (..., vocab) against ``targets`` (...); an
    ignored target counts 0."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def next_token_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss of a batch: ``logits`` (batch, seq, vocab), ``labels`` (batch, seq)."""
    return cross_entropy_sum(logits[:, :-1], labels[:, 1:].to(logits.device))


def scored(labels: torch.Tensor) -> torch.Tensor:
    """Which next-token predictions carry a loss: (batch, seq - 1) booleans."""
    return labels[:, 1:] != IGNORE


def next_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss over scored labels: what ``model(input_ids, labels=labels).loss``
    of a transformers causal LM is."""
    return next_token_sum(logits, labels) / scored(labels).sum().clamp(min=1)


def pipeline_loss(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A pipeline's last-stage loss: the micro-batch's token-sum times its step's scale."""
    labels, scale = target
    return next_token_sum(logits, labels) * scale
