"""Hub loading for real, offline: a Hub cache laid out as huggingface_hub writes it, read by the real from_pretrained.

huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so every Hub scenario runs in a fresh
subprocess with those variables set.
"""

import hashlib
import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import GOLDEN

from modeling_parcae import ParcaeForCausalLM
from modeling_parcae.cli import main as parcae_main


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_hub_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for folder in (repo / "blobs", repo / "refs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        data = source.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob)


def offline_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_python(script: str, tmp_path: Path, *flags: str) -> dict:
    result = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(script)], cwd=tmp_path,
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


HUB_SCRIPT = """
import json, logging
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
import modeling_parcae
from modeling_parcae import from_pretrained_or_official
from modeling_parcae.cli import main as parcae_main

notices = []
handler = logging.Handler()
handler.emit = lambda record: notices.append(record.getMessage())
logging.getLogger("modeling_parcae.conversion.hub").addHandler(handler)

def max_diff(model, case, loops=5):
    reference = load_file(f"{GOLDEN}/{case}/reference.safetensors")
    with torch.no_grad():
        logits = model.eval()(reference["input_ids"], num_loops=loops).logits
    expected = reference[f"logits_zero_{loops}"]
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    return (logits - expected).abs().max().item()

out = {}
out["class_140m"] = max_diff(from_pretrained_or_official("SandyResearch/parcae-140m"), "released_style")
out["notices_first_load"] = list(notices)
notices.clear()
out["class_140m_again"] = max_diff(from_pretrained_or_official("SandyResearch/parcae-140m"), "released_style")
out["notices_second_load"] = list(notices)
try:  # transformers' own loader, untouched by the import: it cannot read the official config.json
    AutoModelForCausalLM.from_pretrained("SandyResearch/parcae-370m")
    out["auto_370m_error"] = None
except (ValueError, OSError, KeyError) as error:
    out["auto_370m_error"] = type(error).__name__
model_370m = from_pretrained_or_official("SandyResearch/parcae-370m")
out["class_370m_type"] = type(model_370m).__name__
out["class_370m"] = max_diff(model_370m, "linear_oddcore", loops=8)
tokenizers = {repo: modeling_parcae.load_tokenizer(repo) for repo in
              ("SandyResearch/parcae-tokenizer", "SandyResearch/parcae-140m")}
out["tokenizers"] = {repo: [t.encode("Hello world!"), t.bos_token_id, t.eos_token_id, t.pad_token_id]
                     for repo, t in tokenizers.items()}
out["cli"] = parcae_main(["convert", "SandyResearch/parcae-140m", "cli_dst"])
out["cli_files"] = sorted(p.name for p in __import__("pathlib").Path("cli_dst").iterdir())
print(json.dumps(out))
"""


def test_official_hub_repos_load_in_one_line_offline(tmp_path, official_layout):
    hub = tmp_path / "hub"
    add_hub_repo(hub, "SandyResearch/parcae-140m", {  # parcae_lm.save_pretrained layout
        "config.json": GOLDEN / "released_style" / "official" / "config.json",
        "model.pt": GOLDEN / "released_style" / "official" / "model.pt"})
    add_hub_repo(hub, "SandyResearch/parcae-370m", {  # receval layout: no _class_name, _orig_mod. prefixes
        "config.json": official_layout("linear_oddcore", "official_receval") / "config.json",
        "pytorch_model.bin": official_layout("linear_oddcore", "official_receval") / "pytorch_model.bin"})
    add_hub_repo(hub, "SandyResearch/parcae-tokenizer", {"tokenizer.json": GOLDEN / "tokenizer" / "tokenizer.json"})

    out = run_python(HUB_SCRIPT.replace("{GOLDEN}", str(GOLDEN)), tmp_path)

    assert out["class_140m"] <= 1e-4 and out["class_140m_again"] <= 1e-4
    assert len(out["notices_first_load"]) == 1 and "official parcae_lm checkpoint" in out["notices_first_load"][0]
    assert out["notices_second_load"] == []  # converted once, then served from the cache
    assert (hub / "parcae-converted" / f"SandyResearch--parcae-140m--{COMMIT}" / "model.safetensors").is_file()
    assert out["auto_370m_error"] is not None  # no hook: AutoModelForCausalLM behaves exactly as transformers does
    assert out["class_370m_type"] == "ParcaeForCausalLM" and out["class_370m"] <= 1e-4
    expected_ids = json.loads((GOLDEN / "tokenizer" / "expected.json").read_text())["cases"][0]["ids"]
    for repo, (ids, bos, eos, pad) in out["tokenizers"].items():
        assert (ids, bos, eos, pad) == (expected_ids, 0, 1, 2), repo
    assert out["cli"] == 0
    assert {"model.safetensors", "tokenizer.json", "README.md", "modeling_parcae.py"} <= set(out["cli_files"])


IMPORT_SCRIPT = """
import json
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
before = {cls.__name__: cls.__dict__["from_pretrained"] for cls in (AutoModelForCausalLM, AutoTokenizer)}
import modeling_parcae
from modeling_parcae import ParcaeConfig, ParcaeForCausalLM, ParcaeModel
after = {cls.__name__: cls.__dict__["from_pretrained"] for cls in (AutoModelForCausalLM, AutoTokenizer)}
print(json.dumps({
    "untouched": [name for name in before if before[name] is after[name]],
    "auto_config": AutoConfig.for_model("parcae").__class__.__name__,
    "auto_model": type(AutoModel.from_config(ParcaeConfig(hidden_size=64, num_attention_heads=2,
                                                          vocab_size=128))).__name__,
}))
"""


def test_import_only_registers_the_classes(tmp_path):
    """`import modeling_parcae` registers config and model classes and replaces no transformers function."""
    out = run_python(IMPORT_SCRIPT, tmp_path)
    assert out["untouched"] == ["AutoModelForCausalLM", "AutoTokenizer"]
    assert out["auto_config"] == "ParcaeConfig" and out["auto_model"] == "ParcaeModel"


REMOTE_CODE_SCRIPT = """
import importlib.util, json, sys
sys.path.extend({site_packages})
assert importlib.util.find_spec("modeling_parcae") is None, "the package must not be importable here"
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{dst}", trust_remote_code=True).eval()
ids = torch.tensor({input_ids})
with torch.no_grad():
    logits = model(ids, num_loops=5).logits
torch.save(logits, "remote_logits.pt")
print(json.dumps({{"module": type(model).__module__}}))
"""


def test_trust_remote_code_load_without_the_package_gives_identical_logits(tmp_path, official_layout):
    dst = tmp_path / "converted"
    assert parcae_main(["convert", str(official_layout("released_style", "official_receval")), str(dst)]) == 0
    input_ids = [[5, 17, 99, 3, 250, 42, 7, 0]]
    with torch.no_grad():
        local = ParcaeForCausalLM.from_pretrained(dst).eval()(torch.tensor(input_ids), num_loops=5).logits
    # -I -S: no PYTHONPATH, no cwd, no .pth files (so the editable install is invisible); site-packages added by hand
    site_packages = [path for path in site.getsitepackages() if Path(path).is_dir()]
    script = REMOTE_CODE_SCRIPT.format(site_packages=site_packages, dst=dst, input_ids=input_ids)
    out = run_python(script, tmp_path, "-I", "-S")
    assert out["module"].startswith("transformers_modules."), out["module"]  # the copied remote code ran
    assert torch.equal(torch.load(tmp_path / "remote_logits.pt"), local)
