"""Shared test helpers: where the golden data lives and how to build small models from it."""

import json
import os
import site
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM
from modeling_parcae.conversion.key_map import official_config_to_parcae_config, official_to_hf_key


REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIXTURES / "golden"
# ~50 KB of tinyshakespeare, shipped with the package as the data of the tiny-cpu recipe
EXCERPT = REPO_ROOT / "configuration" / "recipes" / "data" / "tinyshakespeare_excerpt.txt"
SHARED = Path(os.environ.get("PARCAE_SHARED", REPO_ROOT.parent / "shared"))
PARCAE_CASES = ("released_style", "linear_oddcore", "additive_4head")

torch.set_num_threads(min(2, torch.get_num_threads()))


def golden_case_dir(case: str) -> Path:
    """Committed fixture for the Parcae cases; the 19 MB GPT case is read from ../shared."""
    if case in PARCAE_CASES:
        return GOLDEN / case
    path = SHARED / "golden" / case
    if not path.exists():
        pytest.skip(f"{path} is absent: the {case} golden case (19 MB) is read from ../shared, not committed")
    return path


def load_reference(case: str) -> dict[str, torch.Tensor]:
    return load_file(golden_case_dir(case) / "reference.safetensors")


def load_golden_model(case: str, **config_overrides) -> ParcaeForCausalLM:
    """The official checkpoint of a golden case, mapped key by key (strict) into ``ParcaeForCausalLM``."""
    folder = golden_case_dir(case) / "official"
    config = official_config_to_parcae_config(json.loads((folder / "config.json").read_text()), **config_overrides)
    official = torch.load(folder / "model.pt", weights_only=True)
    state = {official_to_hf_key(key, config.looped): value for key, value in official.items() if key != "freqs_cis"}
    model = ParcaeForCausalLM(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def tiny_config(**overrides) -> ParcaeConfig:
    """A random released-style model small enough for fast tests."""
    fields = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_prelude_layers=1,
        num_core_layers=2, num_coda_layers=1, mean_recurrence=4, mean_backprop_depth=2, max_position_embeddings=256,
    )
    return ParcaeConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> ParcaeForCausalLM:
    torch.manual_seed(seed)
    model = ParcaeForCausalLM(tiny_config(**overrides))
    # o_proj/down_proj start at zero (official init); randomise them so every block influences the output
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.normal_(0, 0.05)
    return model.eval()


def tiny_eval_model(seed: int, context: int):
    """Random released-style model over the golden tokenizer, with a short context so that few-shot prompts get
    cropped; returns ``(model, tokenizer)`` for the evaluation tests."""
    from modeling_parcae.conversion.tokenizer import load_official_tokenizer

    torch.manual_seed(seed)
    config = ParcaeConfig(vocab_size=288, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_prelude_layers=1, num_core_layers=1, num_coda_layers=1, mean_recurrence=3,
                          mean_backprop_depth=2, max_position_embeddings=context)
    return ParcaeForCausalLM(config).eval(), load_official_tokenizer(FIXTURES / "golden" / "tokenizer", context)


def write_receval_layout(case: str, destination: Path) -> Path:
    """The golden checkpoint as the official receval wrapper saves it (``save_pretrained`` in
    ``receval/models/parcae.py``): ``config.json`` without ``_class_name`` and ``pytorch_model.bin`` holding the
    compiled model's state dict (keys prefixed ``_orig_mod.``; the tied head keeps sharing the embedding's storage)."""
    folder = golden_case_dir(case) / "official"
    config = json.loads((folder / "config.json").read_text())
    config.pop("_class_name", None)
    state = torch.load(folder / "model.pt", weights_only=True)
    destination.mkdir(parents=True)
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    torch.save({f"_orig_mod.{key}": value for key, value in state.items()}, destination / "pytorch_model.bin")
    return destination


@pytest.fixture(scope="session")
def official_layout(tmp_path_factory):
    """``official_layout(case, layout)``: the folder of a golden case's official checkpoint in ``layout`` --
    ``"official"`` (as ``parcae_lm.save_pretrained`` writes it, committed) or ``"official_receval"`` (derived from it
    once per session by :func:`write_receval_layout`)."""
    root = tmp_path_factory.mktemp("official_receval")

    def folder(case: str, layout: str = "official") -> Path:
        if layout == "official":
            return golden_case_dir(case) / "official"
        if layout != "official_receval":
            raise ValueError(f"unknown official layout {layout!r}")
        derived = root / case
        return derived if derived.exists() else write_receval_layout(case, derived)

    return folder


def site_packages_without_this_project(folder: Path) -> Path:
    """``folder`` filled with links to this venv's site-packages entries, minus this project's editable install and
    the ``.pth`` files: on ``PYTHONPATH`` of a ``python -S`` it gives every dependency but not the checkout."""
    folder.mkdir()
    for site_dir in site.getsitepackages():
        for entry in os.listdir(site_dir):
            if "parcae" not in entry.lower() and not entry.endswith(".pth"):
                os.symlink(os.path.join(site_dir, entry), folder / entry)
    return folder


@pytest.fixture
def accelerator():
    """A CPU Accelerator whose process-wide state is reset afterwards (Trainer tests build their own)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def bundle() -> Path:
    """The shared CORE eval bundle (its data keep their own licenses and are never committed)."""
    path = SHARED / "eval_bundle"
    if not (path / "core.yaml").is_file():
        pytest.skip(f"{path} is absent: these checks read the shared eval bundle (never committed)")
    return path


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return EXCERPT.read_text()
