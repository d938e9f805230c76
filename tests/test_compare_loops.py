"""`parcae generate --compare-loops` times every depth warm: decode steps at the first depth run once, untimed,
before its timed run (a prefill alone left the first depth's first decode steps cold: 20.9 tok/s at 1 loop against
121.7 at 2 loops)."""

import torch

from modeling_parcae.cli import main
from modeling_parcae.modeling_parcae import ParcaeModel


def test_the_first_depth_decodes_once_untimed_before_it_is_timed(capsys):
    decode_loops = []  # num_loops of every one-token forward of the base model, in call order

    def record(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(module, ParcaeModel) and ids is not None and ids.shape[1] == 1:
            decode_loops.append(int(output.num_loops.flatten()[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(record, with_kwargs=True)
    try:
        assert main(["generate", "--compare-loops", "2,1", "--max-new-tokens", "4", "ROMEO:"]) == 0
    finally:
        handle.remove()
    out = capsys.readouterr().out
    assert out.index("num_loops=2") < out.index("num_loops=1")
    # 3 decode steps per 4-token generation: warm-up at depth 2, then depth 2 timed, then depth 1 timed
    assert decode_loops == [2, 2, 2] + [2, 2, 2] + [1, 1, 1]
