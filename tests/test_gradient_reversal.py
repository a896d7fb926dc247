import pytest
import torch
from torch import nn

from lightning_uda.grl import GradientReversal, gradient_reversal


def _gradients(coeff: float | None):
    """Return (feature grad, discriminator grad, output) of a domain loss behind an optional reversal."""
    torch.manual_seed(0)
    features = nn.Linear(4, 3)
    discriminator = nn.Linear(3, 1)
    inputs = torch.randn(5, 4)
    hidden = features(inputs)
    if coeff is not None:
        hidden = gradient_reversal(hidden, coeff)
    output = discriminator(hidden)
    output.pow(2).sum().backward()
    return features.weight.grad.clone(), discriminator.weight.grad.clone(), output.detach()


@pytest.mark.parametrize("coeff", [0.3, 1.0, 2.5])
def test_reversal_scales_feature_gradient(coeff):
    plain_features, plain_discriminator, plain_output = _gradients(None)
    reversed_features, reversed_discriminator, reversed_output = _gradients(coeff)

    torch.testing.assert_close(reversed_features, -coeff * plain_features)
    torch.testing.assert_close(reversed_discriminator, plain_discriminator)
    torch.testing.assert_close(reversed_output, plain_output)


def test_zero_coefficient_blocks_gradient():
    reversed_features, reversed_discriminator, _ = _gradients(0.0)

    assert torch.count_nonzero(reversed_features) == 0
    assert torch.count_nonzero(reversed_discriminator) > 0


def test_module_form_uses_current_coeff():
    layer = GradientReversal(coeff=1.0)
    inputs = torch.ones(3, requires_grad=True)
    layer.coeff = 0.5
    layer(inputs).sum().backward()

    torch.testing.assert_close(inputs.grad, torch.full((3,), -0.5))


def test_negative_coefficient_rejected():
    with pytest.raises(ValueError, match="coeff must be >= 0"):
        gradient_reversal(torch.ones(2, requires_grad=True), -1.0)
