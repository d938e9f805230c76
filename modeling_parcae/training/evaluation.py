"""Validation loss and bits-per-byte at fixed loop depths during training, with the definition of
``modeling_parcae/scoring.py`` (the one ``parcae eval --bpb-data`` uses).

Documents are split across processes; every process runs the same number of forward passes (padding with empty
batches) so sharded models (FSDP) never wait on each other.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from modeling_parcae.scoring import loss_and_bpb, next_token_batch, next_token_totals


@torch.no_grad()
def validation_metrics(model, accelerator: Accelerator, documents: list[list[int]], byte_lengths: torch.Tensor,
                       depths: list[int] | None, batch_size: int, pad_id: int) -> dict[str, float]:
    """``{"val/loss@d": ..., "val/bpb@d": ...}`` for each depth (``depths=None``: one pass at the model's default)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = documents[rank::world]
    batches_per_rank = math.ceil(math.ceil(len(documents) / world) / batch_size)
    byte_lengths = byte_lengths.to(accelerator.device)
    was_training = model.training
    model.eval()
    metrics = {}
    for depth in depths or [None]:
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nats, tokens, bytes
        for index in range(batches_per_rank):
            batch = shard[index * batch_size:(index + 1) * batch_size]
            if batch:
                inputs, targets, mask = next_token_batch(batch, pad_id, accelerator.device)
            else:  # one fully masked row, so that this process still runs its forward pass
                inputs = targets = torch.full((1, 1), pad_id, device=accelerator.device)
                mask = torch.zeros_like(inputs)
            logits = model(input_ids=inputs, num_loops=depth).logits
            totals += next_token_totals(logits, targets, mask, byte_lengths)
        suffix = "" if depth is None else f"@{depth}"
        metrics[f"val/loss{suffix}"], metrics[f"val/bpb{suffix}"] = loss_and_bpb(
            accelerator.reduce(totals, reduction="sum"))
    model.train(was_training)
    return metrics
