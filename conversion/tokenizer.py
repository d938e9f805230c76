"""Official tokenizer -> ``PreTrainedTokenizerFast`` with the special tokens declared.

The official ``tokenizer.json`` has no post-processor and the official wrapper only knows bos/eos/pad ids when a
``tokenizer_config.json`` declares them (official ``parcae_lm/tokenizer.py``). We declare them, keep
``add_bos_token=False`` so plain encoding equals the official ``encode()``, and leave prepending BOS to the caller (the
CORE evaluation does it).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from modeling_parcae.inputs import local_path_or_hub_id


SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
OFFICIAL_TOKENIZER_REPO = "SandyResearch/parcae-tokenizer"


def tokenizer_json_path(source: str | Path, **hub_kwargs) -> Path:
    """``tokenizer.json`` of a local directory, or downloaded from a Hub repo id (a path that does not exist is
    reported as such, not as a malformed repo id)."""
    local = Path(local_path_or_hub_id(str(source), "tokenizer"))
    if local.is_dir():
        path = local / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{local} has no tokenizer.json")
        return path
    return Path(hf_hub_download(str(source), "tokenizer.json", **hub_kwargs))


def load_official_tokenizer(source: str | Path, model_max_length: int | None = None,
                            **hub_kwargs) -> PreTrainedTokenizerFast:
    """Build the transformers tokenizer from an official tokenizer directory or repo."""
    path = tokenizer_json_path(source, **hub_kwargs)
    # checked on the raw file: declaring a special token that is absent would silently append a new id
    raw = Tokenizer.from_file(str(path))
    absent = [token for token in SPECIAL_TOKENS.values() if raw.token_to_id(token) is None]
    if absent:
        raise ValueError(f"tokenizer from {source} lacks the Parcae special tokens {', '.join(absent)}")
    return PreTrainedTokenizerFast(tokenizer_object=raw, add_bos_token=False, add_eos_token=False,
                                   model_max_length=model_max_length or int(1e30), **SPECIAL_TOKENS)
