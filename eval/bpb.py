"""Validation loss and bits-per-byte with the official definition (reference §8.5): per document, tokens without
BOS truncated to context+1; each target token weighs the UTF-8 length of its decoded text (special tokens weigh 0 and
are left out of the loss); loss = Σnats / #counted tokens, bpb = Σnats / (ln 2 · Σbytes)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from modeling_parcae.eval.modelio import forward_logits, max_length, pad_id_of, pad_right


def read_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """Documents of a ``.jsonl`` file (field ``text``) or of a plain text file (separated by blank lines)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    else:
        docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not docs:
        raise ValueError(f"{path} holds no documents")
    return docs[:limit] if limit else docs


def token_bytes(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 byte length of every token id's decoded text; 0 for special tokens."""
    special = set(tokenizer.all_special_ids)
    lengths = [0 if i in special else len(tokenizer.decode([i]).encode("utf-8")) for i in range(len(tokenizer))]
    table = torch.zeros(max(vocab_size, len(lengths)), dtype=torch.long)
    table[: len(lengths)] = torch.tensor(lengths, dtype=torch.long)
    return table


def bits_per_byte(model, tokenizer, documents: list[str], num_loops: int | None = None, batch_size: int = 8,
                  max_len: int | None = None, progress: bool = True) -> dict:
    """{"loss", "bpb", "tokens", "bytes", "documents"} at ``num_loops``."""
    max_len = max_len or max_length(model)
    weights = token_bytes(tokenizer, model.config.vocab_size)
    rows = [ids[: max_len + 1] for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]]
    rows = [r for r in rows if len(r) >= 2]
    nats, n_tokens, n_bytes = 0.0, 0, 0
    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    for b in tqdm(range(0, len(rows), batch_size), desc=f"bpb T={num_loops}", disable=not progress):
        batch = rows[b: b + batch_size]
        ids, mask = pad_right([r[:-1] for r in batch], pad, device)
        targets, _ = pad_right([r[1:] for r in batch], pad, device)
        logits = forward_logits(model, ids, mask, num_loops)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        tb = weights.to(device)[targets] * mask
        counted = tb > 0
        nats += float(losses[counted].sum())
        n_tokens += int(counted.sum())
        n_bytes += int(tb.sum())
    if n_tokens == 0:
        raise ValueError("no scorable tokens in the bpb documents")
    return {"loss": nats / n_tokens, "bpb": nats / (math.log(2) * n_bytes), "tokens": n_tokens, "bytes": n_bytes,
            "documents": len(rows)}
