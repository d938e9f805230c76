"""Shared test helpers: where the golden data lives and how to build small models from it."""

import json
import os
import site
from pathlib import Path

# torch.compile's on-disk kernel cache is not keyed by ATEN_CPU_CAPABILITY: kernels compiled under one capability are
# reloaded under another and fail to build (`at::vec` undeclared). The `numerics` lane (.ci/run) reruns the suite
# under ATEN_CPU_CAPABILITY=default on the same machine, so each capability gets a cache of its own. Set before torch
# is imported: inductor fixes its cache folder when it is first imported (transformers imports it).
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(
        Path.home() / ".cache" / "parcae-tests" / f"torchinductor-{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

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
    """``folder`` filled with links to this venv's site-packages entries, minus this project (installed or editable)
    and the ``.pth`` files, plus the entries of the folders those files add (the version lane's shared torch): on
    ``PYTHONPATH`` of a ``python -S`` it gives every dependency but not the checkout."""
    folder.mkdir()
    site_dirs = list(site.getsitepackages())
    for site_dir in site.getsitepackages():
        for pth in Path(site_dir).glob("*.pth"):
            site_dirs += [line for line in pth.read_text().splitlines() if Path(line).is_dir()
                          and not Path(line).resolve().is_relative_to(REPO_ROOT)]
    for site_dir in site_dirs:
        for entry in os.listdir(site_dir):
            if "parcae" not in entry.lower() and not entry.endswith(".pth") and not (folder / entry).exists():
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


# ---------------------------------------------------------------------------------------------------------------
# Comparing two kernel paths (cached/uncached, batched/alone, compiled/eager, another CPU): logits agree within a
# tolerance, and a discrete outcome (greedy token, exit depth) is asserted equal only where its margin exceeds that
# tolerance -- a near tie may fall either way on another path and is not a bug.
# ---------------------------------------------------------------------------------------------------------------
def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """The margin of an argmax: best minus second-best logit, per position."""
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def assert_logits_agree(logits: torch.Tensor, reference: torch.Tensor, atol: float) -> None:
    """Logits within ``atol`` of the reference's, and the same argmax wherever the reference's top-2 gap exceeds
    ``2 * atol`` (closer than that, two paths that agree within ``atol`` may pick either token)."""
    difference = (logits.float() - reference.float()).abs().max().item()
    assert difference <= atol, f"logits differ by {difference:.3g} > {atol:g}"
    decided = top2_gap(reference) > 2 * atol
    changed = (logits.argmax(-1) != reference.argmax(-1)) & decided
    assert not changed.any(), f"argmax differs at {changed.nonzero().tolist()} where the margin exceeds {2 * atol:g}"


def greedy_with_logits(model, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate``: the new tokens ``(batch, steps)`` and the logits each was picked from
    ``(batch, steps, vocab)``."""
    with torch.no_grad():
        out = model.generate(input_ids, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                             output_logits=True, **kwargs)
    return out.sequences[:, input_ids.shape[1]:], torch.stack(out.logits, dim=1)


def assert_greedy_agrees(tokens: torch.Tensor, logits: torch.Tensor, reference_tokens: torch.Tensor,
                         reference_logits: torch.Tensor | None, atol: float) -> None:
    """Two greedy decodes of the same prompts, row by row: equal tokens, with the logits of every step within
    ``atol`` of the reference's, until the first step where the tokens differ; that step must be a near tie (top-2
    gap at most ``2 * atol``), and the steps after it are not compared (the two paths then continue different
    texts). ``reference_logits=None`` (e.g. official tokens without their logits): the ties are read from ``logits``.
    """
    assert tokens.shape == reference_tokens.shape, (tokens.shape, reference_tokens.shape)
    for row in range(tokens.shape[0]):
        for step in range(tokens.shape[1]):
            if reference_logits is not None:
                difference = (logits[row, step].float() - reference_logits[row, step].float()).abs().max().item()
                assert difference <= atol, f"row {row} step {step}: logits differ by {difference:.3g} > {atol:g}"
            if tokens[row, step] != reference_tokens[row, step]:
                gap = top2_gap(logits[row, step]).item()
                assert gap <= 2 * atol, (f"row {row} step {step}: token {int(tokens[row, step])} vs "
                                         f"{int(reference_tokens[row, step])} with a top-2 gap of {gap:.3g} > "
                                         f"{2 * atol:g}")
                break


def threshold_with_margin(run, candidates, margin: float = 1e-3) -> float:
    """The first ``exit_threshold`` among ``candidates`` whose exit decisions are decided with a relative margin.

    ``run(threshold)`` returns tensors that depend on every exit decision (loops per token, logits) of the reference
    path. Where scaling the threshold by ``1 -/+ margin`` leaves them bitwise unchanged, no exit criterion met along
    the way lies within ``margin * threshold`` of the threshold, so another path whose criterion is off by less than
    that (kernel rounding: ~1e-6 of the state) takes every decision the same way.
    """
    for threshold in candidates:
        outcomes = [run(threshold * scale) for scale in (1 - margin, 1, 1 + margin)]
        if all(torch.equal(a, b) for other in (outcomes[0], outcomes[2]) for a, b in zip(outcomes[1], other)):
            return threshold
    raise AssertionError(f"no exit_threshold among {list(candidates)} decides every exit with a margin of {margin}")


def exit_threshold_candidates(model, ids, num_loops, mask=None, count=16) -> list[float]:
    """``exit_threshold`` values that mix exit depths and sit far from any token's criterion, for
    :func:`threshold_with_margin`: the relative state change after loop 4 (read from ``output_hidden_states`` of a
    fixed-depth run) of the middle 60% of the tokens, and the midpoints of the widest gaps between neighbouring
    values there, widest first; about half of the tokens exit at loop 4."""
    with torch.no_grad():
        states = model(ids, attention_mask=mask, num_loops=num_loops, output_hidden_states=True,
                       use_cache=False).hidden_states
    first = 1 + model.config.num_prelude_layers
    third, fourth = states[first + 2], states[first + 3]
    change = (fourth - third).norm(dim=-1) / fourth.norm(dim=-1)
    values = (change[mask.bool()] if mask is not None else change.flatten()).sort().values
    values = values[int(0.2 * len(values)): int(0.8 * len(values)) + 1]
    widest = (values[1:] - values[:-1]).argsort(descending=True)[:count]
    return [float(values[i] + values[i + 1]) / 2 for i in widest]
