import math

import pytest
import torch
import torch.nn.functional as F

from lightning_uda.losses import domain_accuracy, domain_adversarial_loss
from lightning_uda.schedules import annealed_lr_factor, grl_coefficient


def test_domain_loss_finite_at_extreme_logits():
    source_logits = torch.tensor([100.0, -100.0, 0.0])
    target_logits = torch.tensor([-100.0, 100.0, 3.0])

    loss = domain_adversarial_loss(source_logits, target_logits)

    assert torch.isfinite(loss)
    expected = 0.5 * (
        F.binary_cross_entropy_with_logits(source_logits, torch.ones(3))
        + F.binary_cross_entropy_with_logits(target_logits, torch.zeros(3))
    )
    torch.testing.assert_close(loss, expected)
    # The wrong-side logits of +-100 cost about 100 nats each, not infinity.
    assert loss.item() == pytest.approx(0.5 * ((100 + math.log(2)) / 3 + (100 + 3.0486) / 3), rel=1e-3)


def test_domain_loss_gradient_finite_at_extreme_logits():
    logits = torch.tensor([100.0, -100.0], requires_grad=True)

    domain_adversarial_loss(logits, -logits).backward()

    assert torch.isfinite(logits.grad).all()


def test_domain_accuracy_counts_both_domains():
    accuracy = domain_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([-2.0, -3.0]))

    assert accuracy.item() == pytest.approx(0.75)


def test_grl_coefficient_ramp():
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(1.0, gamma=10.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coefficient(0.25, gamma=10.0) == pytest.approx(2 / (1 + math.exp(-2.5)) - 1)


def test_annealed_lr_factor_formula():
    assert annealed_lr_factor(0.0) == 1.0
    assert annealed_lr_factor(0.5, alpha=10, beta=0.75) == pytest.approx(6.0**-0.75)


def test_progress_outside_range_clamped_and_nan_rejected():
    assert annealed_lr_factor(1.7) == annealed_lr_factor(1.0)
    with pytest.raises(ValueError, match="NaN"):
        grl_coefficient(float("nan"))
