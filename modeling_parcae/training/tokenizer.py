"""Train a byte-level BPE tokenizer in the official Parcae format (``scripts/tok_train.py``) with ``tokenizers``.

Format: no normalizer; pre-tokenizer = regex Split (GPT-4 style with digits grouped by one or two) then
ByteLevel(add_prefix_space=False, use_regex=False); BPE with ``byte_fallback``; ByteLevel decoder; no
post-processor. Special tokens are trained first so ``<|bos|>``=0, ``<|eos|>``=1, ``<|pad|>``=2. Unlike the official
script, the result is saved as a full transformers tokenizer folder that declares bos/eos/pad.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_parcae.atomic import atomic_directory, check_replaceable

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)


def empty_parcae_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the official pipeline (also what tests compare against the golden JSON)."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path,
                    overwrite: bool = False) -> PreTrainedTokenizerFast:
    """Train on ``texts`` and save a transformers tokenizer folder (complete or not at all; an existing non-empty
    folder only with ``overwrite``); returns the fast tokenizer."""
    check_replaceable(output_dir, overwrite)
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (3 special tokens + 256 bytes), got {vocab_size}")
    tokenizer = empty_parcae_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2], add_bos_token=False, add_eos_token=False,
    )
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        fast.save_pretrained(str(staging))
    return fast


def iter_texts(dataset, text_column: str, max_documents: int | None) -> Iterator[str]:
    """Texts of a ``datasets`` dataset (streaming or not), at most ``max_documents``."""
    for index, document in enumerate(dataset):
        if max_documents is not None and index >= max_documents:
            return
        yield document[text_column]
