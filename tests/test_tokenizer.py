"""The official tokenizer as a PreTrainedTokenizerFast: same ids as the official wrapper, specials declared."""

import json
import shutil

import pytest
from conftest import GOLDEN
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from modeling_parcae.cli import main as parcae_main
from modeling_parcae.conversion.hub import load_tokenizer, maybe_load_official_tokenizer
from modeling_parcae.conversion.tokenizer import load_official_tokenizer


TOKENIZER = GOLDEN / "tokenizer"
EXPECTED = json.loads((TOKENIZER / "expected.json").read_text())


def assert_official_encodings(tokenizer) -> None:
    for case in EXPECTED["cases"]:
        assert tokenizer(case["text"])["input_ids"] == case["ids"], case["text"]
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert tokenizer.decode(case["ids"]) == case["decoded"]


def assert_specials_declared(tokenizer) -> None:
    specials = EXPECTED["special_tokens"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        specials["<|bos|>"], specials["<|eos|>"], specials["<|pad|>"])


def test_converted_tokenizer_matches_official_wrapper():
    tokenizer = load_official_tokenizer(TOKENIZER)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert_official_encodings(tokenizer)  # no BOS/EOS added, exactly like the official encode()
    assert_specials_declared(tokenizer)


def test_core_eval_bos_is_the_declared_bos_id_zero():
    # official CORE prepends tokenizer.bos_id when the tokenizer declares it (else id 1); ours declares <|bos|> = 0
    tokenizer = load_official_tokenizer(TOKENIZER)
    assert [tokenizer.bos_token_id] + tokenizer.encode("Hello world!") == [0] + EXPECTED["cases"][0]["ids"]
    batch = tokenizer(["Hello world!", "Hi"], padding=True)["input_ids"]
    assert batch[1][-1] == EXPECTED["special_tokens"]["<|pad|>"]  # right padding with <|pad|>


def test_converted_model_directory_carries_the_tokenizer_for_autotokenizer(tmp_path):
    dst = tmp_path / "hf"
    assert parcae_main(["convert", str(GOLDEN / "additive_4head" / "official"), str(dst),
                        "--tokenizer", str(TOKENIZER)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert_official_encodings(tokenizer)
    assert_specials_declared(tokenizer)
    assert tokenizer.model_max_length == 64  # the official block_size of this model


def test_load_tokenizer_on_bare_official_tokenizer_declares_specials(tmp_path):
    bare = tmp_path / "parcae-tokenizer"
    bare.mkdir()
    shutil.copy(TOKENIZER / "tokenizer.json", bare)  # what tok_train.py writes: tokenizer.json only
    tokenizer = load_tokenizer(bare)
    assert_official_encodings(tokenizer)
    assert_specials_declared(tokenizer)


def test_tokenizers_with_their_own_config_are_left_to_transformers(tmp_path):
    load_official_tokenizer(TOKENIZER).save_pretrained(tmp_path)  # has tokenizer_config.json
    assert maybe_load_official_tokenizer(tmp_path) is None


def test_tokenizer_without_parcae_specials_is_rejected(tmp_path):
    data = json.loads((TOKENIZER / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|pad|>"]
    data["model"]["vocab"].pop("<|pad|>", None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"lacks the Parcae special tokens <\|pad\|>"):
        load_official_tokenizer(tmp_path)
