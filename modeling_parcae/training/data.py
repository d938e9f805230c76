"""Documents -> tokens -> packed ``block_size + 1`` rows, in a deterministic order that can resume mid-epoch.

Separator choice: every document is followed by the tokenizer's EOS token before packing, so the model sees where
one document ends and the next begins. The official pipeline (``recpre/data_loading_utils.py``) packs documents with
**no** separator and best-fit (cropping) instead of plain concatenation; both differences are deliberate: concatenation
wastes no tokens and makes the row order a pure function of the document order, which is what exact resumption needs.

Row order: local data is tokenized and packed once (cached by ``datasets``), then the rows are shuffled with
``seed + epoch`` each epoch. Hub streaming shuffles documents with a buffer (``seed``, ``set_epoch``) before packing.
Every process reads the same global row sequence and takes its own slice, so the curve does not depend on the number
of processes, and resuming is "skip the rows already consumed" (cheap for local data; for streaming it re-reads the
stream up to the resume point).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import torch

from modeling_parcae.inputs import local_path_or_hub_id
from modeling_parcae.scoring import scoring_rows
from modeling_parcae.training.recipe import DataRecipe

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_documents(path: str, name: str | None, split: str, streaming: bool, sample_by: str):
    """A ``datasets`` dataset of documents: a local file/folder (text, jsonl, parquet) or a Hub dataset id."""
    local = Path(local_path_or_hub_id(path, "data"))
    if local.exists():
        files = sorted(p for p in local.rglob("*") if p.suffix in LOCAL_BUILDERS) if local.is_dir() else [local]
        builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
        if not files or None in builders or len(builders) != 1:
            raise ValueError(
                f"data: {path} must be one .txt/.jsonl/.json/.parquet file or a folder of files of one of these kinds"
            )
        if all(p.stat().st_size == 0 for p in files):
            raise ValueError(f"data: {path} is empty")
        builder = builders.pop()
        options = {"sample_by": sample_by} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train",
                                     streaming=streaming, **options)
    return datasets.load_dataset(path, name, split=split, streaming=streaming)


def column_names(dataset) -> list[str]:
    """Columns of a dataset; a streaming dataset without declared features is asked for its first document."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())


def check_text_column(dataset, text_column: str, where: str) -> None:
    """Fail before training when the configured text column is absent, naming the columns that exist."""
    columns = column_names(dataset)
    if text_column not in columns:
        raise ValueError(
            f"data: text column {text_column!r} not found in {where}; available columns: {', '.join(columns)} "
            "(set data.text_column in the recipe)"
        )


def packing_function(tokenizer, text_column: str, block_size: int) -> Callable[[dict[str, list]], dict[str, list]]:
    """Batched ``map`` function: tokenize, append EOS to each document, cut into rows of ``block_size + 1``.

    The tail of each map batch that does not fill a row is dropped (at most one row per batch of documents).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token; it is needed as the document separator when packing")
    row = block_size + 1

    def pack(batch: dict[str, list]) -> dict[str, list]:
        texts = [text for text in batch[text_column] if text and text.strip()]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        flat = [token for document in ids for token in (*document, eos)]
        return {"input_ids": [flat[start:start + row] for start in range(0, len(flat) - row + 1, row)]}

    return pack


class RowStream:
    """The global sequence of packed rows, epoch after epoch, with a ``(epoch, position)`` state for resuming."""

    def __init__(self, epoch_rows: Callable[[int], Any]):
        self.epoch_rows = epoch_rows
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator | None = None

    def next_rows(self, count: int) -> torch.Tensor:
        """The next ``count`` rows as a (count, block_size + 1) int64 tensor, moving to a new epoch when needed."""
        rows = []
        fresh_epoch = False
        while len(rows) < count:
            if self._iterator is None:
                self._iterator = iter(self.epoch_rows(self.epoch).skip(self.position))
            try:
                rows.append(next(self._iterator)["input_ids"])
                self.position += 1
                fresh_epoch = False
            except StopIteration:
                if fresh_epoch:
                    raise ValueError("data: the training set is too small to fill one row of block_size + 1 tokens")
                self.epoch, self.position, self._iterator, fresh_epoch = self.epoch + 1, 0, None, True
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._iterator = state["epoch"], state["position"], None


def build_training_data(recipe: DataRecipe, tokenizer, seed: int,
                        main_process_first) -> tuple[RowStream, list[list[int]]]:
    """Training rows and validation documents (token lists, no separators, truncated to ``block_size + 1``).

    Validation documents come from ``validation_path`` when given, else the first ``validation_documents`` documents
    of the training source are held out. ``main_process_first`` is Accelerate's context manager, so the tokenization
    cache of local data is built once.
    """
    documents = load_documents(recipe.path, recipe.name, recipe.split, recipe.streaming, recipe.sample_by)
    check_text_column(documents, recipe.text_column, recipe.path)
    if recipe.validation_path:
        validation = load_documents(recipe.validation_path, recipe.validation_name,
                                    recipe.validation_split or recipe.split, recipe.streaming, recipe.sample_by)
        check_text_column(validation, recipe.text_column, recipe.validation_path)
        validation = validation.take(recipe.validation_documents)
    else:
        validation = documents.take(recipe.validation_documents)
        documents = documents.skip(recipe.validation_documents)
    validation_ids = _validation_tokens(validation, tokenizer, recipe.text_column, recipe.block_size)

    pack = packing_function(tokenizer, recipe.text_column, recipe.block_size)
    columns = column_names(documents)  # all of them: packing changes the number of rows
    if recipe.streaming:
        packed = documents.shuffle(seed=seed, buffer_size=recipe.shuffle_buffer)

        def epoch_rows(epoch: int):
            packed.set_epoch(epoch)
            return packed.map(pack, batched=True, remove_columns=columns)
    else:
        with main_process_first():
            packed = documents.map(pack, batched=True, remove_columns=columns, desc="tokenizing and packing")
        if len(packed) == 0:
            raise ValueError(f"data: {recipe.path} holds too little text to fill one row of data.block_size + 1 = "
                             f"{recipe.block_size + 1} tokens (after holding out {recipe.validation_documents} "
                             "validation documents)")

        def epoch_rows(epoch: int):
            return packed.shuffle(seed=seed + epoch)
    return RowStream(epoch_rows), validation_ids


def _validation_tokens(documents, tokenizer, text_column: str, block_size: int) -> list[list[int]]:
    texts = [doc[text_column] for doc in documents if doc[text_column] and doc[text_column].strip()]
    return scoring_rows(tokenizer, texts, block_size)
