"""The MLP's ReLU^2 is the official ``0.5 * relu(x)**2``: same values, the gradient autograd gives that expression (bit
for bit), input untouched.

With identity projections the MLP is its activation alone, so the activation can be compared to the formula.
"""

import pytest
import torch

from modeling_parcae.modeling_parcae import ParcaeMLP


WIDTH = 64


def identity_mlp(dtype: torch.dtype) -> ParcaeMLP:
    mlp = ParcaeMLP(WIDTH, WIDTH, bias=False)
    with torch.no_grad():
        mlp.up_proj.weight.copy_(torch.eye(WIDTH))
        mlp.down_proj.weight.copy_(torch.eye(WIDTH))
    return mlp.to(dtype)


def sample(dtype: torch.dtype) -> torch.Tensor:
    # negatives, zeros, small and large magnitudes
    x = torch.randn(3, 17, WIDTH, generator=torch.Generator().manual_seed(0)) * 4
    x[0, 0, :8] = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 30.0, -30.0, 1.0, -1.0])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_equals_half_relu_squared_to_rounding(dtype):
    x = sample(dtype)
    with torch.no_grad():
        out = identity_mlp(dtype)(x)
    exact = (0.5 * torch.relu(x.double()) ** 2).to(dtype)  # the formula in float64, rounded once
    torch.testing.assert_close(out, exact, rtol=torch.finfo(dtype).eps, atol=0.0)
    assert torch.equal(out, 0.5 * torch.relu(x) ** 2)  # and the official expression in the same dtype, bit for bit


def test_activation_gradient_is_relu_and_reaches_the_weights():
    mlp, x = identity_mlp(torch.float32), sample(torch.float32).requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (mlp(x) * upstream).sum().backward()  # in-place ops on saved tensors would raise here
    torch.testing.assert_close(x.grad, upstream * torch.relu(x.detach()), rtol=1e-6, atol=1e-6)
    assert mlp.up_proj.weight.grad is not None and mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_equals_autograd_of_the_official_expression(dtype):
    """The one-pass backward against autograd through ``0.5 * relu(x)**2``, bit for bit (identity projections are
    exact in both dtypes, forward and backward)."""
    x = sample(dtype)
    upstream = (torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    ours, official = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = identity_mlp(dtype)(ours)
    (out * upstream).sum().backward()
    reference = 0.5 * torch.relu(official) ** 2
    (reference * upstream).sum().backward()
    assert torch.equal(out.detach(), reference.detach())
    assert torch.equal(ours.grad, official.grad)


def test_input_is_not_modified():
    mlp, x = identity_mlp(torch.float32), sample(torch.float32)
    before = x.clone()
    with torch.no_grad():
        mlp(x)
    assert torch.equal(x, before)
