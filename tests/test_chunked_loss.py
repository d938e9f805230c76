"""The chunked head + cross-entropy equals the plain ``F.cross_entropy(linear(...).float())`` in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_parcae.chunked_loss import chunked_linear_cross_entropy


def _plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.to(hidden.dtype).T).float().flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_loss_and_gradients_equal_the_plain_loss(dtype, tolerance):
    """fp32: within 1e-6 (float32 rounding of differently grouped sums). bf16 hidden states (as under autocast):
    both sides round the logits' gradient to bf16 before the matmuls, at different points, so gradients agree to
    2e-2 relative to their scale (measured 6e-3); the losses, from the same bf16 logits in float32, within 1e-6."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 37, 16, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(50, 16, generator=generator) * 0.3).requires_grad_()
    targets = torch.randint(0, 50, (3, 37), generator=generator)
    targets[0, :5] = -100  # ignored rows count neither in the mean nor in the gradients
    expected = _plain(hidden, weight, targets.masked_fill(targets == -100, -100))
    expected.backward()
    expected_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=16)  # 111 rows: 7 chunks, the last short
    (loss * 3).backward()  # a non-unit upstream gradient is applied
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    for got, want in zip((hidden.grad, weight.grad), expected_grads):
        assert got.dtype == want.dtype
        scale = want.float().abs().max()
        assert ((got.float() - 3 * want.float()).abs().max() / scale) < 3 * tolerance


def test_mismatched_targets_are_a_clear_error():
    with pytest.raises(ValueError, match="do not match hidden states"):
        chunked_linear_cross_entropy(torch.zeros(2, 4, 8), torch.zeros(10, 8), torch.zeros(2, 5, dtype=torch.long))
