"""``python -m modeling_parcae.eval ...`` = the ``lm_eval`` command with the ``parcae`` model registered (lm-eval has
no plugin discovery for model names, so the registering import must happen first), e.g.

    python -m modeling_parcae.eval run --model parcae --model_args pretrained=DIR,num_loops=4 \
        --include_path "$(parcae path tasks)" --tasks core --metadata '{"bundle": "../shared/eval_bundle"}'
"""

from lm_eval.__main__ import cli_evaluate

from modeling_parcae.eval import lm  # noqa: F401  (registers --model parcae)
from modeling_parcae.eval.quiet import silence_lm_eval_git_probe

if __name__ == "__main__":
    silence_lm_eval_git_probe()
    cli_evaluate()
