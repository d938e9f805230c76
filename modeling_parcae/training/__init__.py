"""Training: recipes (``recipe``), data packing (``data``), optimiser routing (``optim``), atomic checkpoints
(``checkpoint``), validation at several depths (``evaluation``), the Accelerate loop (``loop``), tokenizer training
(``tokenizer``) and the ``parcae train`` / ``parcae train-tokenizer`` commands (``cli``). See docs/training.md."""
