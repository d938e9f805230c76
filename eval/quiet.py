"""lm-eval's console noise that says nothing about the evaluation, silenced once per process.

``simple_evaluate`` records the git commit of the working directory with ``git describe``, whose stderr reaches the
terminal: outside a git checkout every call prints ``fatal: not a git repository`` (``parcae eval`` calls it once per
depth and seed). lm-eval has no switch for it, so its probe is replaced by the same command with stderr captured.
"""

from __future__ import annotations

import subprocess


def git_commit_hash_quietly() -> str | None:
    """``git describe --always`` of the working directory, or None outside a checkout (nothing printed)."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:  # no git installed
        return None
    return done.stdout.strip() or None


def silence_lm_eval_git_probe() -> None:
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = git_commit_hash_quietly
