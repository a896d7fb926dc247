"""Losses shared by the adversarial algorithms; all take logits, never probabilities."""

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE_DOMAIN_LABEL = 1.0
TARGET_DOMAIN_LABEL = 0.0


def domain_adversarial_loss(source_logits: Tensor, target_logits: Tensor) -> Tensor:
    """Return the binary cross-entropy of a domain discriminator, source labelled 1 and target 0.

    ``L_d = 0.5 * (BCE(d_s, 1) + BCE(d_t, 0))`` computed from logits with
    ``binary_cross_entropy_with_logits``, which stays finite for any finite logit.

    Args:
        source_logits: discriminator logits of source samples, shape (B_s,) or (B_s, 1).
        target_logits: discriminator logits of target samples, shape (B_t,) or (B_t, 1).
    """
    source_logits = source_logits.float().reshape(-1)
    target_logits = target_logits.float().reshape(-1)
    source_loss = F.binary_cross_entropy_with_logits(
        source_logits, torch.full_like(source_logits, SOURCE_DOMAIN_LABEL)
    )
    target_loss = F.binary_cross_entropy_with_logits(
        target_logits, torch.full_like(target_logits, TARGET_DOMAIN_LABEL)
    )
    return 0.5 * (source_loss + target_loss)


def domain_accuracy(source_logits: Tensor, target_logits: Tensor) -> Tensor:
    """Return the fraction of samples whose domain the discriminator gets right (logit > 0 means source)."""
    correct = (source_logits.reshape(-1) > 0).sum() + (target_logits.reshape(-1) <= 0).sum()
    return correct.float() / (source_logits.numel() + target_logits.numel())
