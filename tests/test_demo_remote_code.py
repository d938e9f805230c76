"""The bundled demo model loads through transformers alone: ``auto_map`` + remote code, no ``modeling_parcae``."""

import json
from pathlib import Path

import pytest
import torch
from conftest import site_packages_without_this_project
from test_hub_loading import run_python
from transformers import AutoTokenizer

from modeling_parcae import ParcaeForCausalLM
from modeling_parcae.bundled import demo_model_path


PROMPT = "ROMEO:"

SCRIPT = """
import importlib.util, json, sys
sys.path.extend({site_packages})
assert importlib.util.find_spec("modeling_parcae") is None, "the package must not be importable here"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
path = {demo!r}
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tokenizer({prompt!r}, return_tensors="pt")
tokens = model.generate(**ids, num_loops=4, max_new_tokens=12, do_sample=False)[0].tolist()
generator = pipeline("text-generation", model=path, trust_remote_code=True, dtype=torch.float32)
text = generator({prompt!r}, max_new_tokens=12, do_sample=False, num_loops=4)[0]["generated_text"]
print(json.dumps({{"module": type(model).__module__, "pipeline_module": type(generator.model).__module__,
                  "tokens": tokens, "text": text}}))
"""


@pytest.mark.versions
def test_demo_loads_and_generates_with_trust_remote_code_without_the_package(tmp_path):
    demo = demo_model_path()
    config = json.loads((demo / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_parcae.ParcaeForCausalLM"
    model = ParcaeForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo)
    ids = tokenizer(PROMPT, return_tensors="pt")
    expected = model.generate(**ids, num_loops=4, max_new_tokens=12, do_sample=False)[0]

    # -I -S: no PYTHONPATH, no cwd, no .pth files; every dependency but this project added by hand
    site_packages = [str(site_packages_without_this_project(tmp_path / "site"))]
    out = run_python(SCRIPT.format(site_packages=site_packages, demo=str(demo), prompt=PROMPT), tmp_path, "-I", "-S")

    assert out["module"].startswith("transformers_modules.") and out["pipeline_module"].startswith("transformers_modules.")
    assert out["tokens"] == expected.tolist()
    assert out["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_demo_remote_code_is_the_package_source():
    """The demo carries every file the modeling code imports, each the package's own module (so never stale)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    demo = demo_model_path()
    needed = {Path(path).name for path in get_relative_import_files(str(demo.parent / "modeling_parcae.py"))}
    shipped = {path.name for path in demo.glob("*.py")}
    assert {"modeling_parcae.py", "configuration_parcae.py"} | needed <= shipped
    for name in shipped:
        assert (demo / name).read_bytes() == (demo.parent / name).read_bytes(), name
