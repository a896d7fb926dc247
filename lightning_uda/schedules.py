"""Schedules used across the UDA literature, as pure functions of the training progress ``p`` in [0, 1]."""

import math


def check_progress(progress: float) -> float:
    """Clamp ``progress`` to [0, 1], raising for NaN so a broken count never passes unnoticed."""
    if math.isnan(progress):
        raise ValueError("training progress is NaN; check max_steps / max_epochs of the Trainer")
    return min(max(progress, 0.0), 1.0)


def annealed_lr_factor(progress: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """Return the factor of ``lr_p = lr_0 / (1 + alpha * p) ** beta`` (Ganin et al., JMLR 2016, eq. 15).

    Args:
        progress: training progress ``p`` in [0, 1].
        alpha: speed of the decay (10 in the paper).
        beta: exponent of the decay (0.75 in the paper).
    """
    return (1.0 + alpha * check_progress(progress)) ** (-beta)


def grl_coefficient(progress: float, gamma: float = 10.0) -> float:
    """Return ``lambda_p = 2 / (1 + exp(-gamma * p)) - 1``, the ramp from 0 to 1 of the domain loss weight.

    The ramp (Ganin et al., JMLR 2016, section 5.2.2) keeps the noisy early domain
    discriminator from disturbing the features at the start of training.

    Args:
        progress: training progress ``p`` in [0, 1].
        gamma: steepness of the ramp (10 in the paper).
    """
    return 2.0 / (1.0 + math.exp(-gamma * check_progress(progress))) - 1.0
