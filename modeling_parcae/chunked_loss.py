"""Cross-entropy of ``hidden @ weight.T`` without the (tokens x vocab) logits: the head and the loss, chunk by chunk.

At the parcae-140m training shape (8 x 2048 tokens, vocabulary 32768) the plain loss holds the bf16 logits (1 GiB),
their float32 copy (2 GiB) and its gradient (2 GiB) at once. Here one chunk of rows is projected, its log-softmax
taken in float32, and the gradients with respect to the hidden states and the head weight are computed right away
(the loss is the last op of a step, so its backward only scales them). Peak memory for the head: one chunk of logits
plus a float32 weight gradient.

``torch.nn.functional.linear_cross_entropy`` (torch 2.13) chunks as well; torch 2.11, which the GPU benchmark runs,
has no such function, hence this one. It imports only torch, so it can travel with the model's remote code.
"""

from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        head = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = hidden[start:start + chunk_size]
            chunk_targets = targets[start:start + chunk_size]
            chunk_valid = valid[start:start + chunk_size]
            logits = (rows @ head.T).float()
            log_norm = logits.logsumexp(-1)
            safe_targets = chunk_targets.clamp(min=0)
            picked = logits.gather(1, safe_targets[:, None]).squeeze(1)
            total += ((log_norm - picked) * chunk_valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows; reuses the logits buffer
            grad_logits = logits.sub_(log_norm[:, None]).exp_()
            grad_logits[torch.arange(len(rows), device=rows.device), safe_targets] -= 1.0
            grad_logits.mul_(chunk_valid[:, None])
            grad_logits = grad_logits.to(rows.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ head
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ rows).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype), None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_size: int = 4096, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` over the rows whose target is not
    ``ignore_index``; equal to ``F.cross_entropy((hidden @ weight.T).float(), targets)`` up to float32 rounding.

    ``hidden``: (..., d), cast to the autocast dtype where autocast is on (else its dtype is the compute dtype);
    ``weight``: (vocab, d), e.g. the tied head; ``targets``: (...) token ids. The weight gradient is accumulated in
    float32 and returned in its dtype.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match hidden states of shape "
                         f"{tuple(hidden.shape)} (expected {tuple(hidden.shape[:-1])})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the head's matmuls in the autocast dtype, as ``lm_head(hidden)``
        hidden = hidden.to(torch.get_autocast_dtype(device_type))  # (the final norm returns float32)
    with torch.autocast(device_type, enabled=False):  # the dtypes are chosen explicitly above
        return _ChunkedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(), chunk_size,
                                                ignore_index)
