"""Validation loss and bits-per-byte of a text file, with the official definition (``modeling_parcae/scoring.py``,
shared with training validation): per document, tokens without BOS truncated to context+1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from modeling_parcae.eval.modelio import forward_depth_logits, max_length
from modeling_parcae.eval.procedure import check_limit
from modeling_parcae.scoring import (
    loss_and_bpb, next_token_batch, next_token_totals, pad_id_of, scoring_rows, token_byte_lengths,
)


def read_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """Documents of a ``.jsonl`` file (field ``text``) or of a plain text file (separated by blank lines)."""
    path = Path(path)
    check_limit(limit)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    if path.suffix == ".jsonl":
        docs = [_jsonl_text(path, number, line) for number, line in enumerate(text.splitlines(), start=1)
                if line.strip()]
    else:
        docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not docs:
        raise ValueError(f"{path} holds no documents")
    return docs if limit is None else docs[:limit]


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}, line {number}: expected an object with a string field 'text'")
    return record["text"]


def bits_per_byte(model, tokenizer, documents: list[str], num_loops: int | None = None, batch_size: int = 8,
                  max_len: int | None = None, progress: bool = True) -> dict:
    """{"loss", "bpb", "tokens", "bytes", "documents"} at ``num_loops``."""
    return bits_per_byte_at_depths(model, tokenizer, documents, [num_loops], batch_size, max_len, progress)[num_loops]


def bits_per_byte_at_depths(model, tokenizer, documents: list[str], depths: list[int | None], batch_size: int = 8,
                            max_len: int | None = None, progress: bool = True) -> dict:
    """:func:`bits_per_byte` at every depth of ``depths`` (a looped model scores them all from one pass per batch)."""
    max_len = max_len or max_length(model)
    device = next(model.parameters()).device
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size).to(device)
    rows = scoring_rows(tokenizer, documents, max_len)
    totals = torch.zeros(len(depths), 3, dtype=torch.float64)  # per depth: nats, counted tokens, bytes
    pad = pad_id_of(tokenizer)
    desc = "bpb T=" + ",".join(str(d) for d in depths)
    for b in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress):
        batch = rows[b: b + batch_size]
        ids, targets, mask = next_token_batch(batch, pad, device)
        # right padding: real positions never attend to the padding, so no mask (and the fused causal kernel)
        for k, logits in enumerate(forward_depth_logits(model, ids, None, depths)):
            totals[k] += next_token_totals(logits, targets, mask, byte_lengths).cpu()
    result = {}
    for depth, depth_totals in zip(depths, totals):
        loss, bpb = loss_and_bpb(depth_totals)
        result[depth] = {"loss": loss, "bpb": bpb, "tokens": int(depth_totals[1]), "bytes": int(depth_totals[2]),
                         "documents": len(rows)}
    return result
