"""``parcae generate``: stream a continuation, or compare loop depths side by side; optionally with per-token adaptive
depth (``--exit-threshold``) or the bounded KV cache (``--kv-mode shared``). Each run reports tokens/s, mean loops per
generated token and the KV cache size.

Everything that can be checked cheaply (loop counts, the model path, the prompt length) is checked before the weights
are loaded or any forward runs.
"""

import argparse
import time
import torch

from modeling_parcae.bundled import demo_model_path, model_path_or_name
from modeling_parcae.configuration_parcae import validate_num_loops
from modeling_parcae.inputs import check_device, local_path_or_hub_id
from modeling_parcae.dtypes import DTYPES, torch_dtype


def parse_loop_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``, each a valid loop count."""
    loops = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"loop counts must be positive integers, got {item!r} in {text!r}") from None
        validate_num_loops(value)
        loops.append(value)
    return loops


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with an adjustable number of loops",
        description="Generate a continuation of PROMPT. Without --model, uses the bundled demo model.",
    )
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--model", help="local directory, Hub repo id, or `demo` (default: the bundled demo model)")
    loops = parser.add_mutually_exclusive_group()
    loops.add_argument("--num-loops", type=int, help="core iterations per token (default: the model's num_loops)")
    loops.add_argument("--compare-loops", help="comma-separated loop counts, e.g. 1,2,4,8: one continuation each")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate after the prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest set of tokens "
                        "whose probability reaches P, in (0, 1] (default: off)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations dtype")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--exit-threshold", type=float, default=None, help="per-token adaptive depth: a token stops "
                        "looping once ||h_t - h_{t-1}|| / ||h_t|| < THRESHOLD, capped by the loop count (default: off)")
    parser.add_argument("--kv-mode", choices=sorted(KV_MODES), default="exact", help="exact: one cache slot per loop "
                        "(default); shared: core slots shared by all loops, memory independent of the loop count "
                        "(later tokens read the last loop's keys/values; an approximation)")
    parser.set_defaults(func=run)


WARM_UP_TOKENS = 8  # untimed tokens generated before --compare-loops times its first depth
KV_MODES = {"exact": "DynamicCache", "shared": "ParcaeSharedLoopCache"}


class LoopCounter:
    """Mean loops per generated token: reads ``num_loops`` of every one-token decode step of ``generate`` (a hook on
    the base model; per token under an exit threshold, per forward otherwise)."""

    def __init__(self, model):
        self.loops, self.tokens = 0, 0
        self.handle = model.model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output) -> None:
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds", args[0] if args else None)
        batch, new_tokens = inputs.shape[:2]
        if new_tokens != 1:  # the prompt's prefill is not a generated token
            return
        loops = output.num_loops
        self.loops += int(loops.sum()) if loops.numel() == batch else int(loops.flatten()[0]) * batch
        self.tokens += batch

    def close(self) -> float:
        """Remove the hook; the mean loops per generated token seen so far."""
        self.handle.remove()
        return self.loops / max(self.tokens, 1)


def generate_with_stats(model, prompt_ids: torch.Tensor, num_loops: int, exit_threshold: float | None, kv_mode: str,
                        **kwargs) -> tuple:
    """``model.generate`` with the chosen depth rule and cache; returns (output, tokens/s, mean loops per generated
    token, the cache it filled)."""
    from transformers import DynamicCache

    from modeling_parcae.cache_parcae import ParcaeSharedLoopCache
    from modeling_parcae.transformers_compat import CACHE_NAME

    cache = DynamicCache(config=model.config) if kv_mode == "exact" else ParcaeSharedLoopCache()
    extra = {} if exit_threshold is None else {"exit_threshold": exit_threshold}
    counter = LoopCounter(model)
    start = time.perf_counter()
    try:
        output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), num_loops=num_loops,
                                return_dict_in_generate=True, **{CACHE_NAME: cache}, **extra, **kwargs)
    finally:
        mean_loops = counter.close()
    seconds = time.perf_counter() - start
    new_tokens = output.sequences.shape[1] - prompt_ids.shape[1]
    return output, new_tokens / seconds, mean_loops, cache


def _report(tok_per_s: float, mean_loops: float, cache) -> str:
    """One line per run. The KV size is per cached token: the total after generation depends on where each depth's
    continuation stopped (an early end of text made 2 loops look smaller than 1), the size per token does not."""
    from modeling_parcae.cache_parcae import cache_memory_bytes

    per_token = cache_memory_bytes(cache) / max(cache.get_seq_length(), 1)
    return (f"{tok_per_s:7.1f} tok/s   {mean_loops:5.2f} loops/token   KV cache: {len(cache.layers)} slots, "
            f"{per_token / 2**10:.2f} KiB per cached token")


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from modeling_parcae.configuration_parcae import ParcaeConfig
    from modeling_parcae.conversion.hub import from_pretrained_or_official, load_tokenizer

    loop_counts = parse_loop_list(args.compare_loops) if args.compare_loops else None
    if args.num_loops is not None:
        validate_num_loops(args.num_loops)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_prompt(args.prompt)
    check_sampling(args.temperature, args.top_p, args.top_k)
    check_device(args.device)
    if args.exit_threshold is not None and not args.exit_threshold >= 0:
        raise ValueError(f"--exit-threshold must be >= 0 (0 never exits early), got {args.exit_threshold}")
    model_path = _resolve_model(args.model)

    tokenizer = load_tokenizer(model_path)
    config = ParcaeConfig.from_pretrained(model_path)
    prompt_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    limit = config.max_position_embeddings
    if prompt_ids.shape[1] + args.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_ids.shape[1]} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's "
            f"maximum context of {limit} positions"
        )

    model = from_pretrained_or_official(model_path, dtype=torch_dtype(args.dtype)).to(args.device).eval()
    prompt_ids = prompt_ids.to(args.device)
    sampling = _sampling_kwargs(args)
    if loop_counts is None:
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        torch.manual_seed(args.seed)
        stats = generate_with_stats(model, prompt_ids, args.num_loops or config.num_loops, args.exit_threshold,
                                    args.kv_mode, streamer=streamer, **sampling)
        print(f"\n--- {_report(*stats[1:])}")
        return 0

    print(f"prompt: {args.prompt!r}   ({args.max_new_tokens} new tokens, {_describe(sampling)})")
    # untimed warm-up at the first depth with the timed runs' settings (prefill and decode steps), so the first
    # depth is not timed cold: one prefill alone left its first decode steps paying the warm-up
    generate_with_stats(model, prompt_ids, loop_counts[0], args.exit_threshold, args.kv_mode,
                        **{**sampling, "max_new_tokens": min(WARM_UP_TOKENS, args.max_new_tokens)})
    for loops in loop_counts:
        torch.manual_seed(args.seed)
        stats = generate_with_stats(model, prompt_ids, loops, args.exit_threshold, args.kv_mode, **sampling)
        text = tokenizer.decode(stats[0].sequences[0, prompt_ids.shape[1]:], skip_special_tokens=True)
        print(f"\n--- num_loops={loops:<3} {_report(*stats[1:])}")
        print(args.prompt + text)
    return 0


def check_prompt(prompt: str) -> None:
    """A prompt is non-empty, valid text: bytes that are not UTF-8 reach Python as lone surrogates and are refused."""
    if not prompt.strip():
        raise ValueError("the prompt is empty; give some text to continue, e.g. parcae generate \"ROMEO:\"")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the prompt is not valid UTF-8 text (character {error.start}); check the terminal's "
                         "encoding") from None


def check_sampling(temperature: float, top_p: float | None, top_k: int | None) -> None:
    """Sampling settings transformers would reject mid-generation (or silently ignore), refused up front."""
    if not temperature >= 0:  # also NaN
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")


def _resolve_model(model: str | None) -> str:
    if model is None:
        return str(demo_model_path())
    return local_path_or_hub_id(model_path_or_name(model), "--model")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0)
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kwargs


def _describe(sampling: dict) -> str:
    if not sampling["do_sample"]:
        return "greedy"
    return f"sampling T={sampling['temperature']} top_p={sampling['top_p']} top_k={sampling['top_k']}"
