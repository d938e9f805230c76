"""``parcae`` with a NaN written into one gradient at a chosen optimizer step, for the tests of non-finite steps.

The training loop has no hook for this: the patch wraps ``loop._accumulate_gradients`` (which leaves the step's
gradients in place, right before clipping and gets the loop's ``TrainState``). Run as a script, so it
also works in every process of ``accelerate launch``:

    python tests/nan_injection.py STEP train tiny-cpu KEY=VALUE ...
"""

import sys

from modeling_parcae import cli
from modeling_parcae.training import loop


def inject_nan_at_step(step: int) -> None:
    """From now on, optimizer step ``step`` (1-based, also after a resume) gets a NaN gradient."""
    accumulate_gradients = loop._accumulate_gradients

    def accumulate_then_poison(model, accelerator, micro_batches, state):
        result = accumulate_gradients(model, accelerator, micro_batches, state)
        if state.step + 1 == step:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return result

    loop._accumulate_gradients = accumulate_then_poison


if __name__ == "__main__":
    inject_nan_at_step(int(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))
