"""The eager fast paths compute what the official code computes.

* interleaved RoPE as one complex multiply equals the official pair formula (values and gradients);
* the diagonal injection's loop-invariant part, computed once per forward, gives the same states and the same
  gradients as recomputing it in every loop, and forward hooks on the injection still see every loop.
"""

import pytest
import torch

from conftest import tiny_model
from modeling_parcae.modeling_parcae import ParcaeDiagonalInjection, apply_interleaved_rotary


def official_pair_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The official ``apply_rotary_emb_complex_like``: pairs (2i, 2i+1) rotated in float32 with explicit products."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1).flatten(-2).to(x.dtype)


def rope_inputs(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    batch, heads, tokens, head_dim = 2, 3, 11, 16
    # (B, T, H, D) as attention passes it in: q and k concatenated along the heads, a non-contiguous slice of them
    x = (torch.randn(batch, tokens, 2 * heads, head_dim, generator=generator) * 3).to(dtype)[:, :, 1:heads + 1]
    angles = torch.rand(batch, tokens, head_dim // 2, generator=generator) * 40
    return x, angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rotation_equals_the_official_pair_formula(dtype):
    x, cos, sin = rope_inputs(dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 0.0  # bf16: both round the same float32 values once
    torch.testing.assert_close(apply_interleaved_rotary(x, cos, sin), official_pair_rotation(x, cos, sin),
                               rtol=tolerance, atol=tolerance)


def test_complex_rotation_gradient_equals_the_official_pair_formula():
    x, cos, sin = rope_inputs(torch.float32)
    upstream = torch.randn(x.shape)
    grads = []
    for rotate in (apply_interleaved_rotary, official_pair_rotation):
        leaf = x.detach().clone().requires_grad_()
        (rotate(leaf, cos, sin) * upstream).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def reference_diagonal_injection(injection: ParcaeDiagonalInjection, state, embeds):
    """Official ``DiagonalInjection.forward``, recomputing everything on each call."""
    dt = torch.nn.functional.softplus(injection.dt_bias)
    return state * torch.exp(-dt * torch.exp(injection.A_log)) + dt * (embeds @ injection.B.T)


def test_precomputed_injection_matches_per_loop_recomputation_values_and_gradients():
    model = tiny_model()
    injection = model.model.injection
    with torch.no_grad():
        injection.A_log.normal_(0, 0.5)
        injection.dt_bias.normal_(0, 0.5)
    embeds = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    state = torch.randn(2, 5, model.config.state_size)

    def run(step):
        h = state
        for _ in range(3):
            h = torch.tanh(step(h))  # stands in for the core blocks between injections
        h.square().sum().backward()
        grads = [p.grad.clone() for p in (injection.A_log, injection.dt_bias, injection.B)] + [embeds.grad.clone()]
        injection.zero_grad()
        embeds.grad = None
        return h.detach(), grads

    precomputed = injection.precompute(embeds)
    fast_state, fast_grads = run(lambda h: injection(h, embeds, precomputed))
    slow_state, slow_grads = run(lambda h: reference_diagonal_injection(injection, h, embeds))
    torch.testing.assert_close(fast_state, slow_state, rtol=1e-6, atol=1e-6)
    for fast, slow in zip(fast_grads, slow_grads):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_injection_hooks_see_every_loop():
    model = tiny_model().eval()
    states = []
    model.model.injection.register_forward_pre_hook(lambda module, args: states.append(args[0]))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 6)), num_loops=3)
    assert len(states) == 3
