"""Next-token loss and bits-per-byte, one definition for training validation and ``parcae eval``.

The official runs report, per document (tokens without BOS, at most context + 1): loss = sum of nats / counted tokens
and bpb = sum of nats / (ln 2 * sum of UTF-8 bytes), where a target token weighs the UTF-8 length of
``decode([id])`` and tokens of zero bytes (special tokens) are left out of both sums (official
``receval/tasks/val_loss.py``, ``build_token_bytes``). Only torch is needed, so the training loop and the evaluator both
import it without pulling in each other's dependencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def scoring_rows(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    """One row per document: its tokens without BOS/EOS, truncated to ``context + 1`` (inputs ``row[:-1]`` predict
    targets ``row[1:]``); documents of fewer than two tokens have nothing to score and are dropped."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return [row[: context + 1] for row in ids if len(row) >= 2]


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 length of each token id's decoded text; 0 for special tokens and for ids the tokenizer does not have.
    Long enough for both the model's (possibly padded) vocabulary and the tokenizer's."""
    special = set(tokenizer.all_special_ids)
    lengths = torch.zeros(max(vocab_size, len(tokenizer)), dtype=torch.long)
    for token_id in range(len(tokenizer)):
        if token_id not in special:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


def pad_right(rows: list[list[int]], pad_value: int, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``(ids, attention_mask)``; right padding leaves the real positions of a causal model
    unchanged, so a padded batch scores like one row at a time."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def next_token_batch(rows: list[list[int]], pad_id: int, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(inputs, targets, mask)`` of :func:`scoring_rows`: inputs ``row[:-1]``, targets ``row[1:]``,
    ``mask`` 1 on the real positions."""
    inputs, mask = pad_right([row[:-1] for row in rows], pad_id, device)
    targets, _ = pad_right([row[1:] for row in rows], pad_id, device)
    return inputs, targets, mask


def pad_id_of(tokenizer) -> int:
    """The id used to fill padded positions: the tokenizer's pad token, else 0 (padded positions are masked out, so
    any id in the vocabulary works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def next_token_totals(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      byte_lengths: torch.Tensor) -> torch.Tensor:
    """float64 ``[nats, counted tokens, bytes]`` of one batch: ``logits`` (B, T, V) predict ``targets`` (B, T);
    positions where ``mask`` is 0 or the target weighs 0 bytes are not counted."""
    targets = torch.where(mask.bool(), targets, 0)
    weights = byte_lengths.to(targets.device)[targets] * mask
    counted = weights > 0
    nats = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return torch.stack([torch.where(counted, nats, 0.0).sum().double(), counted.sum().double(),
                        weights.sum().double()])


def loss_and_bpb(totals: torch.Tensor) -> tuple[float, float]:
    """(mean nats per counted token, bits per byte) from summed :func:`next_token_totals`."""
    nats, tokens, n_bytes = (float(x) for x in totals)
    if tokens == 0:
        raise ValueError("no scorable tokens: every target was padding or a special token")
    return nats / tokens, nats / (math.log(2) * n_bytes)
