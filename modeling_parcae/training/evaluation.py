"""Validation loss and bits-per-byte at fixed loop depths, the way the official runs report them (reference §8.5).

Per document (no separators, at most ``block_size + 1`` tokens): loss = sum of nats / counted tokens and
bpb = sum of nats / (ln 2 * sum of UTF-8 bytes), where a token's byte length is that of ``decode([id])`` and tokens
of zero bytes (special tokens) are not counted. Documents are split across processes; every process runs the same
number of forward passes (padding with empty batches) so sharded models (FSDP) never wait on each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 length of each token id's decoded text; 0 for special tokens and ids beyond the tokenizer."""
    special = set(tokenizer.all_special_ids)
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for token_id in range(min(len(tokenizer), vocab_size)):
        if token_id not in special:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


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
            inputs, targets = _pad_batch(shard[index * batch_size:(index + 1) * batch_size], pad_id)
            inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
            logits = model(input_ids=inputs, num_loops=depth).logits.float()
            counted = targets >= 0
            safe_targets = targets.clamp(min=0)
            counted &= byte_lengths[safe_targets] > 0
            nats = F.cross_entropy(logits.transpose(1, 2), safe_targets, reduction="none")
            totals += torch.stack([
                (nats * counted).sum().double(), counted.sum().double(),
                (byte_lengths[safe_targets] * counted).sum().double(),
            ])
        totals = accelerator.reduce(totals, reduction="sum")
        suffix = "" if depth is None else f"@{depth}"
        metrics[f"val/loss{suffix}"] = (totals[0] / totals[1].clamp(min=1)).item()
        metrics[f"val/bpb{suffix}"] = (totals[0] / (math.log(2) * totals[2].clamp(min=1))).item()
    model.train(was_training)
    return metrics


def _pad_batch(documents: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs (``doc[:-1]``) and targets (``doc[1:]``, -100 on padding); an empty list gives one
    fully ignored row so that every process still runs a forward pass."""
    if not documents:
        return torch.full((1, 1), pad_id), torch.full((1, 1), -100)
    width = max(len(document) for document in documents) - 1
    inputs = torch.full((len(documents), width), pad_id)
    targets = torch.full((len(documents), width), -100)
    for row, document in enumerate(documents):
        inputs[row, : len(document) - 1] = torch.tensor(document[:-1])
        targets[row, : len(document) - 1] = torch.tensor(document[1:])
    return inputs, targets
