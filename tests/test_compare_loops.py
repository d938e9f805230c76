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


def test_the_kv_size_is_per_cached_token_so_more_loops_never_show_less(capsys):
    """Issue 36: the KV size was the total after generation, so a depth whose continuation ended early could show
    less memory than a shallower one. Per cached token it is slots x 2 (K, V) x kv width x 4 bytes (float32),
    computed here from the config: P + loops x R + C slots."""
    from modeling_parcae import ParcaeConfig, demo_model_path

    config = ParcaeConfig.from_pretrained(demo_model_path())
    assert main(["generate", "--compare-loops", "1,2", "--max-new-tokens", "6", "ROMEO:"]) == 0
    out = capsys.readouterr().out
    for loops in (1, 2):
        slots = config.num_prelude_layers + loops * config.num_core_layers + config.num_coda_layers
        kib = slots * 2 * config.num_key_value_heads * config.head_dim * 4 / 1024
        assert f"KV cache: {slots} slots, {kib:.2f} KiB per cached token" in out, out
