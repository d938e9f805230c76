"""Validation loss and bits-per-byte of a text file, with the official definition (``modeling_parcae/scoring.py``,
shared with training validation): per document, tokens without BOS truncated to context+1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from modeling_parcae.eval.modelio import forward_logits, max_length
from modeling_parcae.scoring import loss_and_bpb, next_token_totals, pad_id_of, pad_right, token_byte_lengths


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


def bits_per_byte(model, tokenizer, documents: list[str], num_loops: int | None = None, batch_size: int = 8,
                  max_len: int | None = None, progress: bool = True) -> dict:
    """{"loss", "bpb", "tokens", "bytes", "documents"} at ``num_loops``."""
    max_len = max_len or max_length(model)
    device = next(model.parameters()).device
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size).to(device)
    rows = [ids[: max_len + 1] for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]]
    rows = [r for r in rows if len(r) >= 2]
    totals = torch.zeros(3, dtype=torch.float64)  # nats, counted tokens, bytes
    pad = pad_id_of(tokenizer)
    for b in tqdm(range(0, len(rows), batch_size), desc=f"bpb T={num_loops}", disable=not progress):
        batch = rows[b: b + batch_size]
        ids, mask = pad_right([r[:-1] for r in batch], pad, device)
        targets, _ = pad_right([r[1:] for r in batch], pad, device)
        logits = forward_logits(model, ids, mask, num_loops)
        totals += next_token_totals(logits, targets, mask, byte_lengths).cpu()
    loss, bpb = loss_and_bpb(totals)
    return {"loss": loss, "bpb": bpb, "tokens": int(totals[1]), "bytes": int(totals[2]), "documents": len(rows)}
