"""Scoring many token rows (a scored span each) with as little compute as possible, at one or several loop depths.

Rows are grouped per document: the options of one multiple-choice item share a long common token prefix (the
few-shot context). That prefix runs once, with a KV cache, and each option then runs only its own tokens against
the cached prefix (``Cache.batch_select_indices`` copies the document's cache to each option row). Rows without a
shared prefix (single-row documents, prompts cropped differently) run whole, right-padded and without an attention
mask: with right padding a causal model's real positions never see the padding, so the mask is not needed and
attention can take the fused causal kernel.

Several depths come from one pass (``output_depths``, see ``ParcaeModel.forward``) when the model supports them.
Results are ``(summed loss over the span, scored tokens, greedy match)`` per row and depth.

A batch is bounded by rows (``batch_size``) and/or by padded tokens (``max_batch_tokens``: rows x padded width, what
its activations, cached keys/values and logits grow with). On a GPU the token bound comes from the free device memory
(:func:`memory_token_budget`), so short rows pack by the hundred and long ones by the few; documents are sorted by
length first, so a batch pads little. Batching never changes a row's score beyond floating-point reassociation: right
padding is invisible to a causal model's real positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from modeling_parcae.eval.modelio import accepts_logits_to_keep, depth_kwargs, is_looped, logits_at_depths
from modeling_parcae.scoring import pad_right
from modeling_parcae.transformers_compat import cache_of

RowScore = tuple[float, int, bool]

# Share of the free device memory a scoring batch may take: the per-token estimate below is an upper bound of the
# steady state, the rest is headroom for the allocator's fragmentation and the kernels' workspaces.
MEMORY_FRACTION = 0.5
# Below this many tokens a batch that ran out of memory is not retried smaller: the budget was not the problem.
MIN_BATCH_TOKENS = 256


@dataclass(frozen=True)
class Row:
    """Tokens (already cropped to the model's context) and the scored span ``[start, end)``, ``start >= 1``."""

    tokens: list[int]
    start: int
    end: int


@dataclass
class _Document:
    rows: list[Row]
    index: int  # position in the caller's list
    prefix: int  # tokens shared by every row and run once (0: the rows run whole)

    @property
    def suffix_width(self) -> int:
        return max(len(r.tokens) for r in self.rows) - self.prefix


def shared_prefix_length(rows: list[Row]) -> int:
    """Tokens every row starts with, stopping before the first prediction a row needs (position ``start - 1``)."""
    if len(rows) < 2:
        return 0
    limit = min(r.start for r in rows) - 1
    n = 0
    first = rows[0].tokens
    while n < limit and all(r.tokens[n] == first[n] for r in rows[1:]):
        n += 1
    return n


def score_documents(model, documents: list[list[Row]], pad_id: int, depths: list[int | None],
                    batch_size: int | None, max_length: int, desc: str = "scoring", disable_tqdm: bool = True,
                    prefix_cache: Callable[[], object] | None = None, max_batch_tokens: int | None = None
                    ) -> list[list[dict[int | None, RowScore]]]:
    """Per document, per row: ``{depth: (summed loss, scored tokens, greedy match)}``.

    ``depths``: loop counts (``[None]`` = the model's default; several need a looped model with ``output_depths``).
    ``batch_size`` bounds the rows of one forward and ``max_batch_tokens`` its padded tokens (None: no bound);
    ``max_length`` is the model's context (cached prefix + own tokens of a batch must fit in it). ``prefix_cache``
    builds the cache a shared prefix is stored in (default: the model's own; e.g. a bounded ``ParcaeSharedLoopCache``
    to measure its effect on scores, one depth per call: the model refuses it for a depth sweep). A batch that runs out of device memory is retried with the token bound halved.
    """
    docs = [_Document(rows, i, shared_prefix_length(rows)) for i, rows in enumerate(documents)]
    results: list[list[dict]] = [[{} for _ in rows] for rows in documents]
    shared = sorted((d for d in docs if d.prefix > 0), key=lambda d: (-d.prefix, -d.suffix_width))
    whole = sorted((d for d in docs if d.prefix == 0), key=lambda d: -max(len(r.tokens) for r in d.rows))
    device = next(model.parameters()).device
    done: set[int] = set()
    with torch.inference_mode(), tqdm(total=len(docs), desc=desc, disable=disable_tqdm) as progress:
        while len(done) < len(docs):
            groups = [[d for d in group if d.index not in done] for group in (shared, whole)]
            batches = [b for group in groups for b in _batches(group, batch_size, max_length, max_batch_tokens)]
            try:
                for batch in batches:
                    _score_batch(model, batch, pad_id, depths, device, prefix_cache, results)
                    done.update(d.index for d in batch)
                    progress.update(len(batch))
            except torch.cuda.OutOfMemoryError:  # the budget was an estimate: halve it and go on with the rest
                tokens = max_batch_tokens or max(_tokens(b) for b in batches)
                if tokens // 2 < MIN_BATCH_TOKENS:
                    raise
                max_batch_tokens = tokens // 2
                torch.cuda.empty_cache()
    return results


def _score_batch(model, batch: list[_Document], pad_id: int, depths: list[int | None], device,
                 prefix_cache: Callable[[], object] | None, results: list[list[dict]]) -> None:
    rows = [(d, k, row) for d in batch for k, row in enumerate(d.rows)]
    logits_by_depth, first = _forward_batch(model, batch, pad_id, depths, device, prefix_cache)
    for depth, logits in zip(depths, logits_by_depth):
        for (d, k, _), score in zip(rows, _span_scores(logits, rows, first)):
            results[d.index][k][depth] = score


def _width(batch: list[_Document]) -> int:
    """Padded positions per row: the cached prefix is right-padded to the longest one, then the longest own part."""
    return max(d.prefix for d in batch) + max(d.suffix_width for d in batch)


def _tokens(batch: list[_Document]) -> int:
    return sum(len(d.rows) for d in batch) * _width(batch)


def _batches(docs: list[_Document], batch_size: int | None, max_length: int,
             max_batch_tokens: int | None = None) -> list[list[_Document]]:
    """Consecutive documents whose rows fit in ``batch_size``, whose rows x padded width fit in ``max_batch_tokens``
    and whose longest prefix plus longest own part fits in the context. A document never splits (one over the token
    bound runs alone)."""
    batches: list[list[_Document]] = []
    current: list[_Document] = []
    for doc in docs:
        candidate = [*current, doc]
        too_many_rows = batch_size is not None and sum(len(d.rows) for d in candidate) > batch_size
        too_many_tokens = max_batch_tokens is not None and _tokens(candidate) > max_batch_tokens
        if current and (too_many_rows or too_many_tokens or _width(candidate) > max_length):
            batches.append(current)
            candidate = [doc]
        current = candidate
    if current:
        batches.append(current)
    return batches


def bytes_per_token(model, depths: list[int | None]) -> int:
    """Upper estimate of the device memory one padded token of a scoring batch holds at its peak: its keys/values in
    every executed block (the shared-prefix path keeps them all), the logits of every read-out depth in the model's
    dtype and their float32 copy, and one block's activations with the attention mask's row."""
    config = model.config
    itemsize = next(model.parameters()).element_size()
    if is_looped(model):
        loops = max(d if d is not None else config.num_loops for d in depths)
        blocks = config.num_prelude_layers + loops * config.num_core_layers + len(depths) * config.num_coda_layers
    else:
        blocks = getattr(config, "num_hidden_layers", None) or 1
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    cache = blocks * 2 * kv_width * itemsize
    logits = len(depths) * config.vocab_size * (itemsize + 4)
    activations = (8 * hidden + 3 * intermediate) * 4 + getattr(config, "max_position_embeddings", 2048)
    return cache + logits + activations


def memory_token_budget(model, depths: list[int | None], free_bytes: int | None = None) -> int:
    """Padded tokens per scoring batch that fit in ``MEMORY_FRACTION`` of ``free_bytes`` (default: what the model's
    CUDA device has free now)."""
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(next(model.parameters()).device)
    return max(MIN_BATCH_TOKENS, int(MEMORY_FRACTION * free_bytes) // bytes_per_token(model, depths))


def _forward_batch(model, batch: list[_Document], pad_id: int, depths: list[int | None], device,
                   prefix_cache: Callable[[], object] | None = None) -> tuple[list[torch.Tensor], int]:
    """Logits per depth for every row of ``batch`` (in document order) and the position ``first`` they start at:
    position ``first + i`` of a row's logits predicts its token ``first + i + 1``, counted after the shared prefix
    when there is one. Only the positions some row scores get logits (``logits_to_keep``): the prefix forward needs
    none, so a large vocabulary's head runs on the scored spans alone."""
    kwargs = depth_kwargs(model, depths)
    keep_logits = accepts_logits_to_keep(model)
    rows = [row for d in batch for row in d.rows]
    if batch[0].prefix == 0:
        ids, _ = pad_right([r.tokens for r in rows], pad_id, device)
        first = min(r.start for r in rows) - 1 if keep_logits else 0
        out = model(input_ids=ids, use_cache=False, **_keep(keep_logits, ids.shape[1] - first), **kwargs)
        return logits_at_depths(out, depths), first
    prefix_ids, prefix_mask = pad_right([d.rows[0].tokens[: d.prefix] for d in batch], pad_id, device)
    cache = {"cache": prefix_cache()} if prefix_cache is not None else {}
    # right padding: no real prefix position sees a pad, so the prefix needs no mask (fused causal attention); the
    # rows' own forward below masks the padded prefix positions out
    out = model(input_ids=prefix_ids, use_cache=True, **cache, **_keep(keep_logits, 1), **kwargs)
    cache = cache_of(out)
    owner = torch.tensor([i for i, d in enumerate(batch) for _ in d.rows], device=device)
    cache.batch_select_indices(owner)
    own_ids, own_mask = pad_right([r.tokens[d.prefix:] for d in batch for r in d.rows], pad_id, device)
    prefix_lengths = torch.tensor([d.prefix for d in batch for _ in d.rows], device=device)
    # padded own positions repeat the row's last real position: masked out, and never beyond the context
    own_lengths = own_mask.sum(-1, keepdim=True)
    steps = torch.minimum(torch.arange(own_ids.shape[1], device=device), own_lengths - 1)
    first = min(r.start - 1 - d.prefix for d in batch for r in d.rows) if keep_logits else 0
    out = model(input_ids=own_ids, attention_mask=torch.cat([prefix_mask[owner], own_mask], dim=-1),
                position_ids=prefix_lengths[:, None] + steps, use_cache=True, cache=cache,
                **_keep(keep_logits, own_ids.shape[1] - first), **kwargs)
    return logits_at_depths(out, depths), first


def _keep(supported: bool, count: int) -> dict:
    """``logits_to_keep=count`` (the last ``count`` positions) where the model takes it."""
    return {"logits_to_keep": count} if supported else {}


def _span_scores(logits: torch.Tensor, rows: list[tuple[_Document, int, Row]], first: int) -> list[RowScore]:
    """Summed next-token loss over each row's span and whether every span token is the argmax, in one gather
    (``logits`` start at position ``first``, counted after the row's shared prefix)."""
    batch_index, positions, targets, segment = [], [], [], []
    for i, (doc, _, row) in enumerate(rows):
        span = range(row.start, row.end)
        batch_index += [i] * len(span)
        positions += [p - 1 - doc.prefix - first for p in span]
        targets += row.tokens[row.start: row.end]
        segment += [i] * len(span)
    device = logits.device
    picked = logits[torch.tensor(batch_index, device=device), torch.tensor(positions, device=device)]
    target = torch.tensor(targets, device=device)
    segment_t = torch.tensor(segment, device=device)
    nats = F.cross_entropy(picked, target, reduction="none").double()
    loss = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, segment_t, nats)
    misses = torch.zeros(len(rows), dtype=torch.long, device=device).index_add_(
        0, segment_t, (picked.argmax(-1) != target).long())
    return [(total, row.end - row.start, miss == 0)
            for total, miss, (_, _, row) in zip(loss.tolist(), misses.tolist(), rows)]
