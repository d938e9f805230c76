"""`parcae convert` in both directions on the official golden checkpoints, and its refusal of broken inputs."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, PARCAE_CASES, assert_logits_agree, golden_case_dir, load_reference
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_parcae import ParcaeForCausalLM, from_pretrained_or_official
from modeling_parcae.cli import main as parcae_main
from modeling_parcae.conversion.official_format import OfficialFormatError, detect_architecture
from modeling_parcae.conversion.push import push_converted


TOKENIZER = GOLDEN / "tokenizer"
LOOPS = (1, 2, 3, 5, 8, 12)


def convert(src, dst, *extra) -> int:
    return parcae_main(["convert", str(src), str(dst), *map(str, extra)])


def assert_matches_official(model_dir: Path, case: str) -> None:
    model = ParcaeForCausalLM.from_pretrained(model_dir).eval()
    reference = load_reference(case)
    with torch.no_grad():
        if case == "gpt_baseline":
            expected = {None: reference["logits"]}
        else:
            expected = {loops: reference[f"logits_zero_{loops}"] for loops in LOOPS}
        for loops, logits_expected in expected.items():
            logits = model(reference["input_ids"], num_loops=loops).logits
            assert_logits_agree(logits, logits_expected, atol=1e-4)  # argmax only where the margin exceeds 2e-4


def official_state(folder: Path) -> dict:
    name = "model.pt" if (folder / "model.pt").exists() else "pytorch_model.bin"
    return torch.load(folder / name, weights_only=True)


def leftovers(parent: Path) -> list[str]:
    return [path.name for path in parent.iterdir()]


# ---------------------------------------------------------------------------------------------------------------
# official -> transformers -> official
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["official", "official_receval"])
@pytest.mark.parametrize("case", PARCAE_CASES)
def test_every_layout_converts_and_reproduces_official_logits(tmp_path, case, layout, official_layout):
    dst = tmp_path / "hf"
    assert convert(official_layout(case, layout), dst, "--tokenizer", TOKENIZER) == 0
    assert_matches_official(dst, case)


@pytest.mark.numerics
def test_gpt_baseline_converts_and_reproduces_official_logits(tmp_path):
    source = golden_case_dir("gpt_baseline") / "official"  # skips with a message when ../shared is absent
    assert convert(source, tmp_path / "hf") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["looped"] is False
    assert_matches_official(tmp_path / "hf", "gpt_baseline")
    assert convert(tmp_path / "hf", tmp_path / "back", "--to", "official") == 0
    assert_bit_exact(official_state(source), torch.load(tmp_path / "back" / "model.pt", weights_only=True))


def assert_bit_exact(original: dict, round_trip: dict) -> None:
    original = {key.removeprefix("_orig_mod."): value for key, value in original.items()}
    assert list(round_trip) == list(original)  # same keys, same order as the official state_dict()
    for key, value in original.items():
        assert round_trip[key].dtype == value.dtype, key
        if key == "freqs_cis":  # recomputed with torch.cos/sin, whose last bit depends on the CPU's vector unit
            torch.testing.assert_close(round_trip[key], value, rtol=0, atol=1e-6, msg=key)
        else:
            assert torch.equal(round_trip[key], value), key
    # the official model ties lm_head to wte: one storage, as parcae_lm.save_pretrained writes it
    assert round_trip["lm_head.weight"].data_ptr() == round_trip["transformer.wte.weight"].data_ptr()


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["official", "official_receval"])
@pytest.mark.parametrize("case", PARCAE_CASES)
def test_round_trip_to_official_is_bit_exact(tmp_path, case, layout, official_layout):
    source = official_layout(case, layout)
    assert convert(source, tmp_path / "hf") == 0
    assert convert(tmp_path / "hf", tmp_path / "back", "--to", "official") == 0
    assert sorted(path.name for path in (tmp_path / "back").iterdir()) == ["config.json", "model.pt"]
    assert_bit_exact(official_state(source), torch.load(tmp_path / "back" / "model.pt", weights_only=True))
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    original = json.loads((golden_case_dir(case) / "official" / "config.json").read_text())
    assert written["_class_name"] == "ParcaeConfig"  # so parcae_lm.from_pretrained does not fall back to GPT
    assert {k: v for k, v in written.items() if k != "name"} == {k: v for k, v in original.items() if k != "name"}


def test_transformers_directory_layout_and_tied_tensor_stored_once(tmp_path):
    dst = tmp_path / "hf"
    assert convert(GOLDEN / "released_style" / "official", dst, "--tokenizer", TOKENIZER) == 0
    files = {path.name for path in dst.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "configuration_parcae.py", "modeling_parcae.py"} <= files
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "parcae"
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("ParcaeForCausalLM")
    with safe_open(dst / "model.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    card = (dst / "README.md").read_text()
    assert "from_pretrained(" in card and "num_loops=" in card


def test_large_checkpoints_are_sharded_and_still_round_trip(tmp_path):
    source = GOLDEN / "released_style" / "official"
    assert convert(source, tmp_path / "hf", "--max-shard-size", "200KB") == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_matches_official(tmp_path / "hf", "released_style")
    assert convert(tmp_path / "hf", tmp_path / "back", "--to", "official") == 0
    assert_bit_exact(official_state(source), torch.load(tmp_path / "back" / "model.pt", weights_only=True))


# ---------------------------------------------------------------------------------------------------------------
# other official layouts: training checkpoints, nested prefixes, safetensors
# ---------------------------------------------------------------------------------------------------------------
def copy_config(source: Path, target: Path, **changes) -> dict:
    target.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not _DELETE}
    (target / "config.json").write_text(json.dumps(config))
    return config


_DELETE = object()


@pytest.mark.parametrize("file_name", ["model.pt", "step-00000007-run.pth"])
def test_training_checkpoint_with_nested_prefixes_and_no_class_name(tmp_path, file_name):
    source = GOLDEN / "released_style" / "official"
    src = tmp_path / "train"
    copy_config(source, src, _class_name=_DELETE, rope_settings=_DELETE)
    weights = {f"_forward_module.module._orig_mod.{k}": v for k, v in official_state(source).items()}
    torch.save({"model": weights, "optimizer": {}, "step": 7}, src / file_name)
    # a directory in the official layout, or a Fabric checkpoint file given by path (config.json next to it)
    assert convert(src if file_name == "model.pt" else src / file_name, tmp_path / "hf") == 0
    assert_matches_official(tmp_path / "hf", "released_style")


def test_on_the_fly_conversion_failure_raises_and_caches_nothing(tmp_path):
    src = tmp_path / "broken"
    copy_config(GOLDEN / "released_style" / "official", src)
    state = official_state(GOLDEN / "released_style" / "official")
    del state["transformer.ln_f.weight"]
    torch.save(state, src / "model.pt")
    with pytest.raises(ValueError, match="missing keys.*model.norm.weight"):
        from_pretrained_or_official(src, cache_dir=tmp_path / "cache")
    converted = tmp_path / "cache" / "parcae-converted"
    assert not converted.exists() or list(converted.iterdir()) == []


def test_safetensors_weights_with_model_prefix(tmp_path):
    source = GOLDEN / "linear_oddcore" / "official"
    src = tmp_path / "st"
    copy_config(source, src)
    state = {f"model.{k}": v.clone() for k, v in official_state(source).items() if k != "lm_head.weight"}
    save_file(state, src / "model.safetensors")  # safetensors cannot hold the shared head: it is re-tied
    assert convert(src, tmp_path / "hf") == 0
    assert_matches_official(tmp_path / "hf", "linear_oddcore")


def test_missing_class_name_is_decided_by_evidence_never_defaulted_to_gpt(official_layout):
    parcae_config = json.loads((official_layout("released_style", "official_receval") / "config.json").read_text())
    assert "_class_name" not in parcae_config
    assert detect_architecture(parcae_config, ["transformer.core_block.0.norm_1.weight"]) == "parcae"
    assert detect_architecture({"n_embd": 8, "n_layer": 2}, ["transformer.h.0.norm_1.weight"]) == "gpt"
    with pytest.raises(OfficialFormatError, match="cannot tell"):
        detect_architecture({"n_embd": 8}, ["transformer.wte.weight"])
    with pytest.raises(OfficialFormatError, match="cannot tell"):
        detect_architecture({**parcae_config, "_class_name": "GPTConfig"}, ["transformer.core_block.0.x"])


# ---------------------------------------------------------------------------------------------------------------
# broken inputs: a clear error and nothing at DST
# ---------------------------------------------------------------------------------------------------------------
def _unchanged(src: Path, state: dict) -> None:
    torch.save(state, src / "model.pt")


def _truncate(src: Path, state: dict) -> None:
    torch.save(state, src / "model.pt")
    data = (src / "model.pt").read_bytes()
    (src / "model.pt").write_bytes(data[: len(data) // 2])


def _wrong_shape(src, state):
    state["transformer.prelude.0.mlp.fc.weight"] = torch.zeros(3, 64)
    torch.save(state, src / "model.pt")


def _missing_key(src, state):
    del state["transformer.core_block.1.attn.c_v.weight"]
    torch.save(state, src / "model.pt")


def _unexpected_key(src, state):
    state["transformer.core_block.7.attn.c_q.weight"] = torch.zeros(64, 64)
    torch.save(state, src / "model.pt")


def _bf16_rope_table(src, state):
    state["freqs_cis"] = state["freqs_cis"].bfloat16().float()
    torch.save(state, src / "model.pt")


BROKEN = {
    "truncated": (_truncate, {}, "truncated or corrupt"),
    "wrong_shape": (_wrong_shape, {}, r"shape mismatch: model.prelude.0.mlp.up_proj.weight has \(3, 64\)"),
    "missing_key": (_missing_key, {}, "missing keys.*model.core.1.self_attn.v_proj.weight"),
    "unexpected_key": (_unexpected_key, {}, "unexpected keys.*transformer.core_block.7.attn.c_q.weight"),
    "other_architecture": (_unchanged, {"_class_name": "LlamaConfig"}, "names architecture 'LlamaConfig'"),
    "rope_table": (_bf16_rope_table, {}, "freqs_cis differs"),
}


def test_non_finite_weights_are_converted_with_a_warning_naming_the_tensors(tmp_path, caplog):
    """Issue 36: a checkpoint holding NaN/inf (a diverged run) was converted without a word."""
    import logging

    source = GOLDEN / "released_style" / "official"
    src = tmp_path / "src"
    copy_config(source, src)
    state = dict(official_state(source))
    state["transformer.prelude.0.mlp.fc.weight"] = state["transformer.prelude.0.mlp.fc.weight"].clone()
    state["transformer.prelude.0.mlp.fc.weight"][0, 0] = float("nan")
    state["transformer.core_block.1.attn.c_v.weight"] = torch.full_like(
        state["transformer.core_block.1.attn.c_v.weight"], float("inf"))
    torch.save(state, src / "model.pt")
    with caplog.at_level(logging.WARNING):
        assert convert(src, tmp_path / "dst", "--tokenizer", TOKENIZER) == 0
    assert "NaN or inf values in 2 tensor(s)" in caplog.text
    assert "transformer.prelude.0.mlp.fc.weight" in caplog.text and "transformer.core_block.1.attn.c_v.weight" in \
        caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the finite original converts silently
        assert convert(source, tmp_path / "clean", "--tokenizer", TOKENIZER) == 0
    assert "NaN" not in caplog.text


def test_converting_a_transformers_folder_points_to_the_way_back(tmp_path, capsys):
    """Issue 36: `parcae convert` of an already converted folder said only that it is 'not an official config'."""
    from modeling_parcae import demo_model_path

    assert convert(demo_model_path(), tmp_path / "dst") == 2
    error = capsys.readouterr().err
    assert "already a transformers Parcae checkpoint" in error and "--to official" in error
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_input_gives_clear_error_and_leaves_no_dst(tmp_path, capsys, name):
    corrupt, config_changes, message = BROKEN[name]
    source = GOLDEN / "released_style" / "official"
    src, out = tmp_path / "src", tmp_path / "out"
    copy_config(source, src, **config_changes)
    corrupt(src, dict(official_state(source)))
    out.mkdir()
    assert convert(src, out / "dst") == 2
    assert re.search(message, capsys.readouterr().err, flags=re.S)
    assert leftovers(out) == []  # neither DST nor a half-written temporary directory


def test_existing_destination_is_never_overwritten_without_flag(tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert(GOLDEN / "released_style" / "official", dst) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert convert(GOLDEN / "released_style" / "official", dst, "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# parcae push
# ---------------------------------------------------------------------------------------------------------------
class RecordingHubApi:
    """Stands in for the network side of HfApi only; the directory checks under test are the real ones."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, {op.path_in_repo: op for op in operations}))


def test_push_uploads_a_complete_converted_directory_and_refuses_official_ones(tmp_path):
    assert convert(GOLDEN / "released_style" / "official", tmp_path / "hf", "--tokenizer", TOKENIZER) == 0
    api = RecordingHubApi()
    push_converted(tmp_path / "hf", "me/parcae-tiny", api=api)
    (_, repo, _), (_, committed_repo, files) = api.calls
    assert repo == committed_repo == "me/parcae-tiny"
    assert {"model.safetensors", "README.md", "modeling_parcae.py", "tokenizer.json", "config.json"} <= set(files)
    card = files["README.md"].path_or_fileobj.decode()
    assert 'from_pretrained("me/parcae-tiny", trust_remote_code=True' in card
    with pytest.raises(ValueError, match="parcae convert"):
        push_converted(GOLDEN / "released_style" / "official", "me/x", api=RecordingHubApi())
    (tmp_path / "hf" / "cache_parcae.py").unlink()  # a sibling the modeling code imports (issue 36)
    with pytest.raises(FileNotFoundError, match=r"cache_parcae.py \(needed by modeling_parcae.py\)"):
        push_converted(tmp_path / "hf", "me/x", api=RecordingHubApi())
    (tmp_path / "hf" / "modeling_parcae.py").unlink()
    with pytest.raises(FileNotFoundError, match="modeling_parcae.py"):
        push_converted(tmp_path / "hf", "me/x", api=RecordingHubApi())
