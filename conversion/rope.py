"""The official RoPE table, recomputed so the converter can check (not load) a checkpoint's ``freqs_cis`` buffer."""

from __future__ import annotations

import torch


# Float32 recomputation on another device or code path may differ by an ulp in inv_freq, and the angle error grows
# with the position (~1.5e-4 at position 2047 was seen here), so the allowed error grows linearly with it. A table
# saved from a bf16-cast model is off by ~1e-3 already at position 1 (the official loader casts
# ``freqs_cis`` with the model, ``parcae_lm/__init__.py``) and is still caught.
FREQS_CIS_TOLERANCE_PER_POSITION = 1e-6


def official_freqs_cis(head_dim: int, block_size: int, theta: float) -> torch.Tensor:
    """``(1, block_size, 1, head_dim // 2, 2)`` float32 table of (cos, sin), as official ``precompute_freqs_cis``
    (``parcae_lm/modules/utils.py``) builds it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    positions = torch.arange(block_size, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    table = torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1)
    return table.view(1, block_size, 1, head_dim // 2, 2)


def freqs_cis_problem(found: torch.Tensor, head_dim: int, block_size: int, theta: float) -> str | None:
    """Describe why a checkpoint's ``freqs_cis`` differs from the recomputed table, or ``None`` when it matches."""
    expected = official_freqs_cis(head_dim, block_size, theta)
    if tuple(found.shape) != tuple(expected.shape):
        return f"freqs_cis has shape {tuple(found.shape)}, the recomputed RoPE table {tuple(expected.shape)}"
    if found.dtype != torch.float32:
        return f"freqs_cis is {found.dtype}, expected float32 (was the model cast before saving?)"
    allowed = FREQS_CIS_TOLERANCE_PER_POSITION * (1 + torch.arange(block_size, dtype=torch.float32))
    excess = (found - expected).abs() - allowed.view(1, block_size, 1, 1, 1)
    if bool((excess > 0).any()):
        position = int((excess > 0).nonzero()[0, 1])
        diff = (found - expected)[:, position].abs().max().item()
        return (f"freqs_cis differs from the recomputed RoPE table by {diff:.3g} at position {position} "
                f"(allowed {allowed[position].item():.2g}); was the model cast to a lower precision before saving?")
    return None
