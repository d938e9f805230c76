"""Rough edges a new user hit, each answered by one clear message naming the file, path or key at fault."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_parcae.eval.procedure import load_items
from modeling_parcae.eval.specs import TASKS


def _bundle_with(tmp_path: Path, labels: list[str]) -> Path:
    bundle = tmp_path / "bundle"
    for label in labels:
        path = bundle / "eval_data" / TASKS[label].dataset_uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    (bundle / "core.yaml").write_text("icl_tasks: []\n")
    return bundle


def test_missing_task_data_names_the_file_the_tasks_that_cannot_run_and_those_that_can(tmp_path):
    bundle = _bundle_with(tmp_path, ["copa", "piqa"])
    with pytest.raises(FileNotFoundError) as error:
        load_items(bundle, TASKS["mmlu_zeroshot"])
    message = str(error.value)
    assert f"has no eval_data/{TASKS['mmlu_zeroshot'].dataset_uri}" in message
    assert "lacks the data of 44 of 46 tasks" in message and "core_hellaswag" in message
    assert "--tasks core_copa,core_piqa" in message or "--tasks core_piqa,core_copa" in message


FIXTURES = Path(__file__).parent / "fixtures" / "golden"
OFFICIAL = FIXTURES / "released_style" / "official"
PARCAE = str(Path(sys.executable).parent / "parcae")
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_a_round_trip_keeps_the_config_name_and_carries_the_tokenizer_both_ways(tmp_path):
    from modeling_parcae import load_tokenizer
    from modeling_parcae.conversion.convert import convert_official_to_transformers, convert_transformers_to_official

    converted = convert_official_to_transformers(OFFICIAL, tmp_path / "some-folder-hf",
                                                 tokenizer_source=FIXTURES / "tokenizer")
    back = convert_transformers_to_official(converted, tmp_path / "another-folder")
    assert json.loads((back / "config.json").read_text())["name"] == json.loads(
        (OFFICIAL / "config.json").read_text())["name"] == "tiny-released-style"
    assert (back / "tokenizer.json").read_bytes() == (converted / "tokenizer.json").read_bytes()
    text = "To be, or not to be"
    assert load_tokenizer(back)(text).input_ids == load_tokenizer(converted)(text).input_ids


def test_a_missing_local_tokenizer_path_is_reported_as_a_missing_path(tmp_path, capsys):
    from modeling_parcae.cli import main

    assert main(["convert", str(OFFICIAL), str(tmp_path / "dst"), "--tokenizer", "./no-such-tokenizer"]) == 2
    error = capsys.readouterr().err
    assert "path ./no-such-tokenizer does not exist" in error and "Repo id" not in error
    assert not (tmp_path / "dst").exists()


def test_an_official_checkpoint_without_tokenizer_offline_says_so(tmp_path):
    model = tmp_path / "official-no-tokenizer"
    shutil.copytree(OFFICIAL, model)
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf")}  # an empty Hub cache: the official tokenizer is not in it
    result = subprocess.run([PARCAE, "generate", "--model", str(model), "Hi"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"parcae generate: error: no tokenizer for {model}: it holds no tokenizer.json")
    assert "SandyResearch/parcae-tokenizer" in line and "HF_HUB_OFFLINE is set" in line


def test_truncated_safetensors_name_the_file_from_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from modeling_parcae import ParcaeForCausalLM, demo_model_path

    model = tmp_path / "model"
    shutil.copytree(demo_model_path(), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for loader in (ParcaeForCausalLM, AutoModelForCausalLM):
        with pytest.raises(ValueError, match=re.escape(f"{weights} is truncated or corrupt")):
            loader.from_pretrained(model)


def test_a_bad_line_in_a_task_file_names_the_file_and_the_line(tmp_path):
    bundle = _bundle_with(tmp_path, ["copa"])
    path = bundle / "eval_data" / TASKS["copa"].dataset_uri
    path.write_text(path.read_text() + '{"query": "q", "choices": ["a", "b"], "gold": 0\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: not valid JSON")):
        load_items(bundle, TASKS["copa"])


def test_the_next_conversion_removes_what_a_killed_one_left_even_when_it_refuses(tmp_path, capsys):
    from modeling_parcae.cli import main

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".dst.partial-{int(dead.stdout)}-x1y2"  # a killed conversion's staging folder
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("an existing destination")
    assert main(["convert", str(OFFICIAL), str(tmp_path / "dst")]) == 2  # refused: dst exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert not orphan.exists() and (tmp_path / "dst" / "keep").is_file()


def test_a_misspelt_config_key_is_refused_naming_it_and_the_key_meant():
    from modeling_parcae import ParcaeConfig, load_preset

    with pytest.raises(ValueError, match=r"mean_recurence.*mean_recurrence"):
        load_preset("parcae-140m", mean_recurence=16)
    with pytest.raises(ValueError, match=r"mean_recurence.*mean_recurrence"):
        ParcaeConfig(mean_recurence=16)


def test_parcae_eval_names_the_missing_file_of_each_task_it_skips(tmp_path, caplog):
    import logging

    from modeling_parcae import ParcaeConfig, ParcaeForCausalLM, load_tokenizer
    from modeling_parcae.eval.runner import evaluate

    bundle = _bundle_with(tmp_path, ["copa"])
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\nhellaswag,25\n")
    tokenizer = load_tokenizer(FIXTURES / "tokenizer")
    config = ParcaeConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_prelude_layers=1, num_core_layers=1, num_coda_layers=1, max_position_embeddings=64)
    model = ParcaeForCausalLM(config).eval()
    with caplog.at_level(logging.WARNING):
        report = evaluate(model, tokenizer, model_name="tiny", labels=["copa", "hellaswag"], bundle=bundle,
                          seeds=[1234], loops=[1], limit=1)
    assert report["skipped"] == ["hellaswag"]
    assert f"hellaswag (eval_data/{TASKS['hellaswag'].dataset_uri})" in caplog.text


def _demo_copy_with_config(tmp_path: Path, **changes) -> Path:
    from modeling_parcae import demo_model_path

    folder = tmp_path / "model"
    shutil.copytree(demo_model_path(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _warnings(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)


def test_a_config_with_keys_this_version_does_not_know_loads_with_a_warning_naming_them(tmp_path, caplog):
    """Issue 36: a config.json from a newer release (a new field, a newer transformers) loaded silently as the old
    model; a misspelt known field is refused, so an unknown one must at least be named."""
    from modeling_parcae import ParcaeConfig

    newer = _demo_copy_with_config(tmp_path, loop_schedule="cosine", transformers_version="6.3.0")
    with caplog.at_level(logging.WARNING):
        config = ParcaeConfig.from_pretrained(newer)
    assert config.loop_schedule == "cosine"  # kept, as transformers keeps unknown keys
    assert "'loop_schedule'" in _warnings(caplog) and "transformers 6.3.0" in _warnings(caplog)


def test_transformers_bookkeeping_keys_load_silently(tmp_path, caplog):
    """architectures, auto_map, model_type, dtype, an older transformers_version (the demo's config.json has them all),
    and the keys older releases or the converter write, with normal values: no warning."""
    from modeling_parcae import ParcaeConfig

    folder = _demo_copy_with_config(tmp_path, _name_or_path="SandyResearch/parcae-140m", torch_dtype="float16",
                                    official_name="parcae-small-140m", transformers_version="5.0.0")
    with caplog.at_level(logging.WARNING):
        ParcaeConfig.from_pretrained(folder)
    assert _warnings(caplog) == ""


def test_a_config_saved_by_any_supported_transformers_loads_silently_on_every_other(tmp_path, caplog):
    """Within 5.16.1-5.25 a config means the same on each release: one saved on 5.25 loads without a word on 5.16."""
    from modeling_parcae import ParcaeConfig

    with caplog.at_level(logging.WARNING):
        ParcaeConfig.from_pretrained(_demo_copy_with_config(tmp_path, transformers_version="5.25.0"))
    assert _warnings(caplog) == ""


@pytest.mark.parametrize("loader", ["ParcaeForCausalLM", "AutoModelForCausalLM"])
def test_a_misspelt_from_pretrained_keyword_is_refused_naming_the_field_meant(loader):
    """Issue 36: `from_pretrained(path, num_loop=4)` was a bare TypeError from the model's __init__, while
    `ParcaeConfig(num_loop=4)` says which field was meant."""
    import transformers

    import modeling_parcae

    cls = getattr(modeling_parcae, loader, None) or getattr(transformers, loader)
    with pytest.raises(ValueError, match=r"unknown config field 'num_loop': did you mean 'num_loops'\?"):
        cls.from_pretrained(modeling_parcae.demo_model_path(), num_loop=4)
