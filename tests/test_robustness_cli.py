"""Every `parcae` subcommand answers a bad value, option, file or environment with one clear line on stderr and exit
status 2 — never a traceback, never a misleading Hub error — and documents every option with its default."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXCERPT, REPO_ROOT
from modeling_parcae.cli import build_parser
from modeling_parcae.cli import main as parcae_main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def parcae(*args: str | bytes, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeling_parcae.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess | tuple[int, str], command: str) -> str:
    """The single ``parcae COMMAND: error: ...`` line of a failed run (progress bars and warnings aside)."""
    code, err = (result.returncode, result.stderr) if isinstance(result, subprocess.CompletedProcess) else result
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"parcae {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def in_process(capsys, *args: str) -> tuple[int, str]:
    try:
        code = parcae_main(list(args))
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# configs and recipes
# ---------------------------------------------------------------------------------------------------------------
def test_recipe_value_of_the_wrong_type_is_one_line(tmp_path):
    line = one_error_line(parcae("train", "tiny-cpu", f"output_dir={tmp_path / 'run'}", "training.max_steps=ten"),
                          "train")
    assert "training.max_steps must be of type int | None, got 'ten'" in line
    assert not (tmp_path / "run").exists()


def test_invalid_model_config_from_transformers_strict_validation_is_one_line(tmp_path):
    """ParcaeConfig's validators raise huggingface_hub's StrictDataclassError, which is not a ValueError."""
    line = one_error_line(parcae("train", "tiny-cpu", f"output_dir={tmp_path / 'run'}",
                                 "model.config.num_attention_heads=3"), "train")
    assert "hidden_size (64) must be divisible by num_attention_heads (3)" in line


def test_bad_yaml_override_is_one_line(capsys):
    line = one_error_line(in_process(capsys, "train", "tiny-cpu", "eval.depths=[1,"), "train")
    assert "while parsing" in line or "expected" in line


# ---------------------------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,command,option",
    [
        (["convert", "./no/such/checkpoint", "out"], "convert", "SRC"),
        (["push", "./no/such/checkpoint", "me/model"], "push", "SRC"),
        (["eval", "--model", "./no/such/model", "--tasks", "bpb", "--text", str(EXCERPT)],
         "eval", "--model"),
        (["generate", "--model", "no/such/model/dir", "Hi"], "generate", "--model"),
        (["train", "tiny-cpu", "data.path=missing/corpus.txt"], "train", "data"),
        (["train-tokenizer", "--data", "./missing.jsonl", "--output", "tok"], "train-tokenizer", "data"),
    ],
    ids=["convert", "push", "eval", "generate", "train-data", "train-tokenizer"],
)
def test_missing_local_path_says_it_does_not_exist(capsys, args, command, option):
    line = one_error_line(in_process(capsys, *args), command)
    assert f"{option}: path" in line and "does not exist" in line
    assert "Repo id" not in line


# ---------------------------------------------------------------------------------------------------------------
# files: truncated or damaged
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_report_is_named_by_compare(tmp_path, capsys):
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"model": "a", "baselines": "v1", "results": {"1": {}}}))
    cut = tmp_path / "b.json"
    cut.write_text(good.read_text()[:-7])
    line = one_error_line(in_process(capsys, "compare", str(good), str(cut)), "compare")
    assert f"report {cut} is not valid JSON (line 1, column" in line and "truncated" in line


def _demo_copy(tmp_path: Path) -> Path:
    import shutil

    from modeling_parcae.bundled import demo_model_path

    model = tmp_path / "model"
    shutil.copytree(demo_model_path(), model)
    return model


def _loading_error(tmp_path: Path, capsys, command: str, model: Path) -> str:
    """The one error line of `parcae generate` or `parcae eval --tasks bpb` loading ``model``."""
    text = tmp_path / "docs.txt"
    text.write_text("To be, or not to be.\n")
    args = (["generate", "--model", str(model), "Hi"] if command == "generate" else
            ["eval", "--model", str(model), "--tasks", "bpb", "--text", str(text)])
    return one_error_line(in_process(capsys, *args), command)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_truncated_weights_are_named_when_loading_a_model(tmp_path, capsys, command):
    model = _demo_copy(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert f"{weights} is truncated or corrupt" in _loading_error(tmp_path, capsys, command, model)


def test_compare_names_the_tasks_it_drops(tmp_path, capsys):
    def report(tasks: dict) -> Path:
        path = tmp_path / f"{len(tasks)}.json"
        path.write_text(json.dumps({"model": str(len(tasks)), "baselines": "v1", "results": {"1": {
            "tasks": {label: {"acc": acc} for label, acc in tasks.items()}}}}))
        return path

    a = report({"hellaswag": 0.3, "piqa": 0.6, "boolq": 0.5})
    b = report({"hellaswag": 0.4, "piqa": 0.7})
    assert parcae_main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "dropped (in only one report): boolq" in out


def test_bad_jsonl_line_is_named_for_bpb(tmp_path):
    from modeling_parcae.eval.bpb import read_documents

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl, line 2: not valid JSON"):
        read_documents(path)
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl, line 2: expected an object with a string field 'text'"):
        read_documents(path)
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_documents(path.with_suffix(".jsonl"))


def test_empty_training_text_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = one_error_line(in_process(capsys, "train", "tiny-cpu", f"data.path={empty}",
                                     f"output_dir={tmp_path / 'run'}"), "train")
    assert f"data: {empty} is empty" in line


# ---------------------------------------------------------------------------------------------------------------
# parcae eval --limit: one meaning for tasks and bpb
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["0", "-3", "x"])
def test_eval_limit_must_be_positive(capsys, limit):
    code, err = in_process(capsys, "eval", "--model", "m", "--tasks", "bpb", "--text", "t.txt", "--limit", limit)
    assert code == 2 and "--limit: expected a positive integer" in err


def test_eval_refuses_a_loop_count_below_one_before_loading(capsys):
    line = one_error_line(in_process(capsys, "eval", "--model", "./no/such/model", "--num-loops", "0,2", "--tasks",
                                     "bpb", "--text", str(EXCERPT)), "eval")
    assert "--num-loops must be >= 1, got 0" in line


def test_limit_means_the_first_n_for_tasks_and_bpb(tmp_path):
    from modeling_parcae.eval.bpb import read_documents
    from modeling_parcae.eval.procedure import load_items
    from modeling_parcae.eval.specs import TASKS

    text = tmp_path / "docs.txt"
    text.write_text("one\n\ntwo\n\nthree\n")
    assert read_documents(text, 2) == ["one", "two"] and read_documents(text) == ["one", "two", "three"]
    spec = TASKS["copa"]
    data = tmp_path / "bundle" / "eval_data" / spec.dataset_uri
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    assert len(load_items(tmp_path / "bundle", spec, 3)) == 3 and len(load_items(tmp_path / "bundle", spec)) == 10
    for bad in (0, -1):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            read_documents(text, bad)
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            load_items(tmp_path / "bundle", spec, bad)


# ---------------------------------------------------------------------------------------------------------------
# parcae generate: prompt, sampling, device — refused before the model loads
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "-0.5", "Hi"], "--temperature must be >= 0"),
        (["--temperature", "0.7", "--top-p", "0", "Hi"], r"--top-p must lie in (0, 1], got 0.0"),
        (["--temperature", "0.7", "--top-p", "1.5", "Hi"], r"--top-p must lie in (0, 1], got 1.5"),
        (["--top-k", "0", "Hi"], "--top-k must be >= 1"),
        (["   "], "the prompt is empty"),
        (["\udcff\udcfe"], "the prompt is not valid UTF-8 text"),
    ],
    ids=["negative-temperature", "top-p-zero", "top-p-above-one", "top-k-zero", "empty-prompt", "non-utf8-prompt"],
)
def test_generate_refuses_bad_settings_clearly(capsys, args, message):
    line = one_error_line(in_process(capsys, "generate", *args), "generate")
    assert message in line


def test_device_that_is_not_there_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    line = one_error_line(in_process(capsys, "generate", "--device", "cuda", "Hi"), "generate")
    assert "--device cuda: no cuda device is available on this machine" in line
    line = one_error_line(in_process(capsys, "eval", "--model", "m", "--device", "cuda", "--tasks", "bpb",
                                     "--text", "t.txt"), "eval")
    assert "no cuda device is available" in line


def test_non_utf8_prompt_from_the_shell(tmp_path):
    """Bytes that are not UTF-8 on the command line reach Python as surrogates: refused, no traceback."""
    result = subprocess.run([sys.executable, "-m", "modeling_parcae.cli", "generate", b"\xff\xfeabc"], cwd=REPO_ROOT,
                            env=ENV, capture_output=True, timeout=300)
    result = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                         result.stderr.decode(errors="replace"))
    assert "the prompt is not valid UTF-8 text" in one_error_line(result, "generate")


# ---------------------------------------------------------------------------------------------------------------
# the command itself: version, help for every option, bundled recipes from anywhere
# ---------------------------------------------------------------------------------------------------------------
def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        parcae_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"parcae {version('parcae-transformers')}"


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    parsers = _subcommand_parsers()
    assert {"generate", "convert", "push", "eval", "compare", "train", "train-tokenizer"} <= set(parsers)
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"parcae {name} {action.dest} has no help text"
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in (action.help or "") or f"(default: {action.default})" in " ".join(text.split()), \
                    f"parcae {name} {action.option_strings[0]} does not show its default"
    convert = " ".join(parsers["convert"].format_help().split())
    assert "(default: transformers)" in convert and "(default: 2GB)" in convert
    assert "(default: 100)" in " ".join(parsers["generate"].format_help().split())
    eval_help = " ".join(parsers["eval"].format_help().split())
    assert "by default three times" in eval_help


def test_bundled_recipe_works_from_any_directory(tmp_path):
    """After `pip install`, `parcae train tiny-cpu` must not look for its data under the current directory."""
    code = ("from modeling_parcae.training.recipe import load_recipe; import pathlib; r = load_recipe('tiny-cpu'); "
            "print(pathlib.Path(r.data.path).is_file(), pathlib.Path(r.tokenizer).is_dir())")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# lm_eval on the project's tasks, offline and without a bundle
# ---------------------------------------------------------------------------------------------------------------
def test_lm_eval_offline_without_bundle_explains_how_to_point_at_one(tmp_path, monkeypatch):
    """What `lm_eval --model hf ... --include_path <tasks>` does when it builds a CORE task, with HF_HUB_OFFLINE=1:
    no download is attempted and the error names PARCAE_EVAL_BUNDLE and --metadata."""
    import urllib.request

    from lm_eval.tasks import TaskManager

    from modeling_parcae.eval.runner import TASKS_DIR

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PARCAE_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("PARCAE_CACHE", str(tmp_path / "cache"))
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    with pytest.raises(Exception) as error:
        manager.load(["core_copa"])
    message = str(error.value)
    assert "HF_HUB_OFFLINE=1 forbids downloading" in message
    assert "PARCAE_EVAL_BUNDLE=DIR" in message and "--metadata" in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# `parcae --help` stays light
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["--version"], []], ids=["help", "version", "bare"])
def test_top_level_help_imports_neither_torch_nor_transformers(tmp_path, args):
    """The installed console script answers without loading the heavy libraries (`-X importtime` lists every
    module imported), so `parcae --help` is instant instead of seconds."""
    script = Path(sys.executable).parent / "parcae"
    result = subprocess.run([sys.executable, "-X", "importtime", str(script), *args], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == (2 if not args else 0), result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "parcae_command" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers", "modeling_parcae")}
    if args == ["--help"]:
        assert "train-tokenizer" in result.stdout and "parcae COMMAND --help" in result.stdout


def test_front_door_lists_the_help_the_subcommands_register():
    from parcae_command import COMMAND_HELP

    registered = {}
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for choice in action._choices_actions:
        registered[choice.dest] = choice.help
    assert registered == COMMAND_HELP


def test_subcommands_still_reach_their_module_through_the_console_script(tmp_path):
    script = Path(sys.executable).parent / "parcae"
    result = subprocess.run([str(script), "generate", "--temperature", "-1", "Hi"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert "--temperature must be >= 0" in one_error_line(result, "generate")


# ---------------------------------------------------------------------------------------------------------------
# argument order
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--compile", "--resume"])
def test_overrides_may_follow_an_option(tmp_path, capsys, flag):
    """Issue 36: `parcae train tiny-cpu --resume training.max_steps=50` failed with "unrecognized arguments" and the
    top-level usage. The override after the flag now reaches the recipe (here: its type error, before any work)."""
    line = one_error_line(in_process(capsys, "train", "tiny-cpu", flag, f"output_dir={tmp_path / 'run'}",
                                     "training.max_steps=ten"), "train")
    assert "training.max_steps must be of type int | None, got 'ten'" in line


def test_an_unknown_option_is_reported_with_the_subcommands_usage(capsys):
    """`parcae generate --do-sample` showed the top-level usage (`parcae [-h] [--version] COMMAND`)."""
    code, err = in_process(capsys, "generate", "--do-sample", "ROMEO:")
    assert code == 2
    assert err.startswith("usage: parcae generate ") and "parcae generate: error: unrecognized arguments: --do-sample" \
        in err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_folder_without_its_weights_file_says_what_is_missing_and_what_to_do(tmp_path, capsys, command):
    """Issue 36: transformers' generic "Error no file named model.safetensors, or pytorch_model.bin" said neither
    that the folder is incomplete nor how to mend it."""
    model = _demo_copy(tmp_path)
    (model / "model.safetensors").unlink()
    line = _loading_error(tmp_path, capsys, command, model)
    assert f"{model} holds a config.json but no weights (model.safetensors," in line
    assert "incomplete" in line and "save_pretrained" in line


def test_a_folder_that_lost_a_remote_code_file_loads_here_with_a_warning_naming_it(tmp_path, caplog):
    """The package loads the folder with its own code; without the package (trust_remote_code=True) it would fail
    with "No such file or directory: .../cache_parcae.py", so the missing sibling is named where it loads here."""
    import logging

    model = _demo_copy(tmp_path)
    (model / "cache_parcae.py").unlink()
    with caplog.at_level(logging.WARNING):
        assert parcae_main(["generate", "--model", str(model), "--max-new-tokens", "1", "Hi"]) == 0
    assert "lacks remote code cache_parcae.py (needed by modeling_parcae.py)" in caplog.text
    assert "trust_remote_code=True" in caplog.text
