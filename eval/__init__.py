"""CORE / Core-Extended evaluation of Parcae (and Transformer baselines) exactly as the paper scores them, through
lm-eval (``parcae eval``; lm-eval model ``parcae``; task YAMLs in ``tasks/``), plus bits-per-byte and an lm-eval-free
reference scorer. See docs/evaluation.md."""
