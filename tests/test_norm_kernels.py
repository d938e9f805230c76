"""The norms run on torch's ``F.rms_norm`` (one call instead of five elementwise ones, and float32 for half-precision
qk-norm inputs, whose CPU kernel is some twenty times slower): the values must stay those of the official expressions.

* block norms (``ParcaeRMSNorm``): the official ``RMSNorm``, float32 math, cast back before the weight;
* qk-norm: the official ``F.rms_norm(states, (head_dim,))`` on the rotated states in their own dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from modeling_parcae.modeling_parcae import ParcaeAttention, ParcaeRMSNorm, apply_interleaved_rotary
from conftest import tiny_config


def official_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def varied(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of very different scales (a zero row and a tiny one included)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.rand((*shape[:-1], 1), generator=generator) * 4
    rows = x.view(-1, shape[-1])
    if len(rows) > 2:
        rows[0], rows[1] = 0.0, rows[1] * 1e-4
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 17, 96)])  # a decode step, a prefill
def test_block_norm_equals_the_official_rms_norm(dtype, shape):
    norm = ParcaeRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=torch.Generator().manual_seed(3)) + 0.5)
    norm = norm.to(dtype)
    x = varied(shape, dtype, seed=1)
    with torch.no_grad():
        out = norm(x)
    expected = official_rms_norm(x, norm.weight, 1e-5)
    assert out.dtype == dtype
    # one rounding of float32 apart at most (torch's kernel may order the float32 products differently)
    torch.testing.assert_close(out, expected, rtol=2 * torch.finfo(dtype).eps if dtype == torch.float32 else 0.0,
                               atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 17])
def test_qk_norm_equals_the_official_call_in_every_dtype(dtype, tokens):
    config = tiny_config()
    attention = ParcaeAttention(config, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                has_ve_gate=False)
    heads, head_dim = 2 * config.num_attention_heads, config.head_dim
    states = varied((2, tokens, heads, head_dim), dtype, seed=2)
    angles = torch.rand(2, tokens, head_dim // 2, generator=torch.Generator().manual_seed(4)) * 6
    cos, sin = angles.cos(), angles.sin()
    out = attention._rotate_and_norm(states, cos, sin)
    expected = F.rms_norm(apply_interleaved_rotary(states, cos, sin), (head_dim,))  # the official call, own dtype
    assert out.dtype == dtype
    assert torch.equal(out, expected)
