"""Gradient reversal (Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015)."""

import torch
from torch import Tensor, nn


class _GradientReversalFunction(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``-coeff`` in the backward pass."""

    @staticmethod
    def forward(ctx, inputs: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output.neg() * ctx.coeff, None


def gradient_reversal(inputs: Tensor, coeff: float = 1.0) -> Tensor:
    """Apply gradient reversal: ``y = x`` forward, ``dL/dx = -coeff * dL/dy`` backward.

    Args:
        inputs: any tensor that requires grad.
        coeff: non-negative scale of the reversed gradient; 0 blocks the gradient entirely.
    """
    if coeff < 0:
        raise ValueError(f"coeff must be >= 0, got {coeff}, because a negative coefficient would undo the reversal")
    return _GradientReversalFunction.apply(inputs, float(coeff))


class GradientReversal(nn.Module):
    """Module form of :func:`gradient_reversal` whose coefficient is set before each forward pass.

    Args:
        coeff: initial coefficient; a training loop usually overwrites ``self.coeff`` every step.
    """

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__()
        self.coeff = coeff

    def forward(self, inputs: Tensor) -> Tensor:
        return gradient_reversal(inputs, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"
