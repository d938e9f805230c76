"""Without the package, a saved Parcae folder loads through transformers' Auto classes with `trust_remote_code=True`
and nothing asks a question: `AutoModel` is in `auto_map`, and the tokenizer is a standard class."""

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM, demo_model_path

PROMPT = "Do you wish to run the custom code?"
STANDARD_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}

SCRIPT = """
import importlib.util, sys
sys.path.extend({site_packages!r})
assert importlib.util.find_spec("modeling_parcae") is None, "the package must not be importable here"
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
path = {path!r}
base = AutoModel.from_pretrained(path, trust_remote_code=True)
causal = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
print(type(base).__name__, type(causal).__name__, len(tokenizer("ROMEO:").input_ids) > 0)
"""


def _auto_map_and_tokenizer(folder: Path) -> None:
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_parcae.ParcaeConfig",
                        "AutoModel": "modeling_parcae.ParcaeModel",
                        "AutoModelForCausalLM": "modeling_parcae.ParcaeForCausalLM"}
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] in STANDARD_TOKENIZERS and "auto_map" not in tokenizer_config


def test_the_demo_loads_with_every_auto_class_without_the_package_and_without_a_prompt(tmp_path):
    demo = demo_model_path()
    _auto_map_and_tokenizer(demo)
    site_packages = [path for path in site.getsitepackages() if Path(path).is_dir()]
    # -I -S: no cwd, no PYTHONPATH, no .pth files (the editable install is invisible); stdin empty, so a prompt would
    # show in the output instead of waiting
    script = SCRIPT.format(site_packages=site_packages, path=str(demo))
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ParcaeModel", "ParcaeForCausalLM", "True"]
    assert PROMPT not in result.stdout + result.stderr


def test_save_pretrained_writes_automodel_into_auto_map(tmp_path):
    config = ParcaeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_prelude_layers=1, num_core_layers=1, num_coda_layers=1, max_position_embeddings=32)
    ParcaeForCausalLM(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_parcae.ParcaeModel"
