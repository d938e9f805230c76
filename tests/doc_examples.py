"""Collecting and running the fenced examples of a markdown document, for ``tests/test_docs_examples.py``.

A document's ``python`` and shell (``bash``/``sh``/``shell``) blocks run in document order in one workspace, a fresh
directory outside the checkout (with ``../shared`` linked beside it when the checkout has one), so an example that
relies on a checkout-relative path fails. Shell blocks run under ``bash -e`` with the installed package's ``parcae``
first on ``PATH``; the python blocks of a document share one interpreter and one namespace, like a notebook, so a
later block may use what an earlier one defined. Everything runs offline.

A block preceded by ``<!-- doc-test: skip REASON -->`` (e.g. ``skip gpu: ...``, ``skip network: ...``) is reported as
skipped with that reason; a block naming ``../shared/...`` files that are absent is skipped saying which.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

SHELL_LANGUAGES = {"bash", "sh", "shell"}
LANGUAGES = SHELL_LANGUAGES | {"python"}
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w-]*)\s*$")
DIRECTIVE = re.compile(r"<!--\s*doc-test:\s*skip\s+(?P<reason>.+?)\s*-->")
PROMPT = "Do you wish to run the custom code?"  # transformers' trust_remote_code question
SHARED_PATH = re.compile(r"\.\./shared/[\w./-]+")


@dataclass
class Example:
    document: str  # a label: the document's path relative to the checkout
    line: int  # line of the opening fence, 1-based
    language: str
    code: str
    skip: str | None = None  # the reason given in the markdown

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"


def collect(text: str, document: str) -> list[Example]:
    """Every fenced python / shell block of ``text`` with the skip reason written before it, in document order."""
    examples, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        language = match["language"]
        if language in LANGUAGES:
            body = textwrap.dedent("\n".join(lines[index + 1:end])) + "\n"
            before = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
            directive = DIRECTIVE.search(before)
            examples.append(Example(document, index + 1, "python" if language == "python" else "bash", body,
                                    directive["reason"] if directive else None))
        index = end + 1
    return examples


def missing_shared_files(example: Example, shared: Path) -> list[str]:
    """The ``../shared/...`` paths an example names that this machine lacks."""
    return [name for name in SHARED_PATH.findall(example.code)
            if not (shared.parent / name.removeprefix("../")).exists()]


DRIVER = r"""
import json, os, sys, traceback
# the protocol keeps its own descriptors; the examples read an empty stdin (a prompt fails instead of waiting) and
# what they print, their subprocesses too, goes to the log
commands, protocol = os.fdopen(os.dup(0)), os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)
sys.stdout = sys.stderr
namespace = {"__name__": "__main__"}
for line in commands:
    path = line.strip()
    print(f"===== {path}", flush=True)
    try:
        exec(compile(open(path).read(), path, "exec"), namespace)
        result = {"ok": True}
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc()}
    sys.stdout.flush()
    protocol.write(json.dumps(result) + "\n")
    protocol.flush()
"""


class DocumentRun:
    """Runs one document's examples in order in its own workspace; each result is kept for its test."""

    def __init__(self, root: Path, environment: dict, python: str):
        self.work = root / "work"
        self.work.mkdir(parents=True)
        self.environment = environment
        self.python = python
        self.log = root / "output.log"
        self.interpreter: subprocess.Popen | None = None
        self.count = 0

    def run(self, example: Example, timeout: float) -> tuple[bool, str]:
        """(passed, output or error) of one example; examples of the document must come in order."""
        self.count += 1
        suffix = "py" if example.language == "python" else "sh"
        script = self.work.parent / f"example-{self.count:02d}-line{example.line}.{suffix}"
        script.write_text(example.code)
        start = self.log.stat().st_size if self.log.exists() else 0
        if example.language == "python":
            passed, error = self._run_python(script, timeout)
        else:
            with open(self.log, "a") as log:
                log.write(f"===== {script}\n")
                log.flush()
                # its own process group: a timeout ends what the example started too (a server, a launcher)
                shell = subprocess.Popen(["bash", "-e", "-o", "pipefail", str(script)], cwd=self.work,
                                         env=self.environment, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    status = shell.wait(timeout=timeout)
                    passed, error = status == 0, f"exit status {status}"
                except subprocess.TimeoutExpired:
                    os.killpg(shell.pid, signal.SIGKILL)
                    shell.wait()
                    passed, error = False, f"still running after {timeout:.0f} s"
        with open(self.log) as log:
            log.seek(start)
            output = log.read()
        if passed and PROMPT in output:
            passed, error = False, "it stopped at an interactive prompt (answered by the empty stdin)"
        return passed, output if passed else f"{error}\n--- output ---\n{output[-6000:]}"

    def _run_python(self, script: Path, timeout: float) -> tuple[bool, str]:
        if self.interpreter is None:
            self.interpreter = subprocess.Popen(
                [self.python, "-c", DRIVER], cwd=self.work, env=self.environment, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=open(self.log, "a"), text=True)
        self.interpreter.stdin.write(f"{script}\n")
        self.interpreter.stdin.flush()
        reply = _read_line(self.interpreter, timeout)
        if reply is None:
            self.close()
            return False, f"the python example did not finish within {timeout:.0f} s (or its interpreter died)"
        result = json.loads(reply)
        return result["ok"], result.get("error", "")

    def close(self) -> None:
        if self.interpreter is not None:
            self.interpreter.kill()
            self.interpreter.wait()
            self.interpreter = None


def _read_line(process: subprocess.Popen, timeout: float) -> str | None:
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return None
    line = process.stdout.readline()
    return line or None


def environment(home: Path) -> dict:
    """Offline, single-threaded, caches in ``home``, the venv's ``parcae``/``python`` first on PATH, no checkout on
    ``sys.path``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "PARCAE", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home / "hf"),
               PARCAE_CACHE=str(home / "parcae-cache"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               MPLBACKEND="Agg", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env
