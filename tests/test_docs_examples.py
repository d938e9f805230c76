"""Every fenced python and shell example of the README, docs/*.md and the model cards the package ships runs as
written: offline, from a directory outside the checkout, against the installed package (``tests/doc_examples.py``
says how). Examples that need a GPU or the network say so in the markdown and are reported as skipped with that
reason."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from doc_examples import DocumentRun, Example, collect, environment, missing_shared_files

from modeling_parcae.bundled import demo_model_path
from modeling_parcae.conversion.model_card import REPO_PLACEHOLDER

pytestmark = pytest.mark.docs  # make test-slow (every example starts interpreters: minutes in all)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TIMEOUT = 300
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), demo_model_path() / "README.md"]


def _label(path: Path) -> str:
    return "modeling_parcae/demo/README.md" if path.parent == demo_model_path() else str(path.relative_to(ROOT))


EXAMPLES = [example for path in DOCUMENTS for example in collect(path.read_text(), _label(path))]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """One workspace per document, ``../shared`` beside it, created on first use and kept for its later examples."""
    opened: dict[str, DocumentRun] = {}
    done: dict[str, tuple[bool, str]] = {}
    home = tmp_path_factory.mktemp("doc-home")

    def run(example: Example) -> tuple[bool, str]:
        if example.document not in opened:
            root = tmp_path_factory.mktemp(Path(example.document).stem)
            if SHARED.is_dir():
                (root / "shared").symlink_to(SHARED)
            opened[example.document] = DocumentRun(root, environment(home), sys.executable)
        document = opened[example.document]
        for earlier in EXAMPLES:  # the examples before this one, run once each, in order (also under -k)
            if earlier.document == example.document and earlier.line <= example.line and earlier.id not in done \
                    and _skip_reason(earlier) is None:
                done[earlier.id] = document.run(earlier, TIMEOUT)
        return done[example.id]

    yield run
    for document in opened.values():
        document.close()


def _skip_reason(example: Example) -> str | None:
    if example.skip:
        return example.skip
    missing = missing_shared_files(example, SHARED)
    return f"needs {', '.join(missing)} (absent on this machine)" if missing else None


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_documented_example_runs(example, runs):
    reason = _skip_reason(example)
    if reason:
        pytest.skip(reason)
    passed, output = runs(example)
    assert passed, f"{example.id} ({example.language}) failed:\n{example.code}\n{output}"


def test_every_document_has_examples_and_skips_say_why():
    """The collector finds the blocks (a broken fence pattern would silently collect nothing)."""
    by_document = {example.document for example in EXAMPLES}
    assert {"README.md", "docs/generation.md", "docs/training.md", "docs/evaluation.md",
            "modeling_parcae/demo/README.md"} <= by_document
    for example in EXAMPLES:
        assert example.skip is None or len(example.skip.split()) >= 2, f"{example.id}: say why it is skipped"


@pytest.mark.skipif(not (SHARED / "golden" / "core_eval").is_dir(),
                    reason=f"needs {SHARED / 'golden' / 'core_eval'} (a checkpoint with its own tokenizer)")
def test_the_model_card_parcae_convert_writes_runs(tmp_path):
    """The card `parcae convert` writes next to converted weights: its loading examples run against that folder
    (the placeholder is what `parcae push` replaces by the repo id; here it is the folder itself)."""
    env = environment(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    golden = SHARED / "golden" / "core_eval"
    converted = work / "converted"
    done = subprocess.run(["parcae", "convert", str(golden / "model"), str(converted), "--tokenizer",
                           str(golden / "tokenizer")], cwd=work, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    card = (converted / "README.md").read_text().replace(REPO_PLACEHOLDER, str(converted))
    examples = collect(card, "model card")
    assert examples, "the model card has no examples"
    document = DocumentRun(tmp_path / "card", env, sys.executable)
    try:
        for example in examples:
            assert example.skip is None
            passed, output = document.run(example, TIMEOUT)
            assert passed, f"model card example at line {example.line} failed:\n{example.code}\n{output}"
    finally:
        document.close()


INLINE_TRAINING_ARGUMENTS = sorted({span for path in DOCUMENTS
                                    for span in re.findall(r"`(TrainingArguments\([^`]*\))`", path.read_text())})


@pytest.mark.parametrize("expression", INLINE_TRAINING_ARGUMENTS)
def test_inline_training_arguments_of_the_docs_construct_on_this_machine(expression, tmp_path, monkeypatch):
    """Issue 36: docs/training.md recommended `TrainingArguments(bf16=True)`, which transformers refuses on a CPU
    without `use_cpu=True`. Fenced examples run in test_docs_examples; the settings quoted in the prose must hold too
    (the machine that runs the suite has no GPU where it matters most: a user's laptop)."""
    from transformers import TrainingArguments

    monkeypatch.chdir(tmp_path)  # TrainingArguments' default output_dir is relative
    assert isinstance(eval(expression, {"TrainingArguments": TrainingArguments}), TrainingArguments)
