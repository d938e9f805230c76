"""Speed and peak memory at the released shapes: Parcae vs the Llama it unrolls to vs the official model class.

For each preset (``parcae-140m``, ``parcae-370m``, random weights) and dtype (fp32, bf16) on CPU, three models run the
same work (see ``released_models.py``): ours, a transformers ``LlamaForCausalLM`` executing as many blocks with equal
FLOPs per block, and the official ``parcae_lm`` class on the same weight tensors (skipped, with the reason in the
output, when ``PARCAE_OFFICIAL_SRC`` does not point at the official source tree).

* prefill: one forward over B=2 x T=512 tokens, full logits, no cache (the scoring forward);
* decode: one cached greedy step for B=1 and B=8 after a 256-token prompt. The prompt's keys/values are random
  tensors of the right shape written into each model's own cache: a decode step's cost depends on the cache length,
  not its contents, and prefilling 8 x 256 tokens per setting would cost more than the whole prefill benchmark.

Runs are interleaved (every model at every loop count inside one repeat, the model order rotated per repeat) and
the median is reported, so the ratios hold on a shared machine; the 1-minute load average is sampled throughout and
saved. Peak memory is the resident memory one extra, untimed call adds (``peak_memory.py``).

    PARCAE_OFFICIAL_SRC=/tmp/official-parcae python benchmarks/bench_released_shapes.py     # full, < 10 min on 2 cores
    python benchmarks/bench_released_shapes.py --quick          # parcae-140m, 8 loops: a smoke run
    python benchmarks/bench_released_shapes.py --presets parcae-140m --dtypes bf16 --modes prefill --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

import peak_memory
from released_models import (
    build_llama, build_official, build_parcae, executed_depth, import_official, set_llama_depth,
)
from modeling_parcae import ParcaeSlotMap
from modeling_parcae.cache_parcae import prepare_cache
from modeling_parcae.atomic import write_atomically


RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PREFILL_BATCH, PREFILL_TOKENS, PROMPT_TOKENS = 2, 512, 256


# -- the three models behind one interface ---------------------------------------------------------------------------

class Contender:
    """One model: a prefill forward, and a decode step against a cache already holding a prompt."""

    name: str

    def prefill(self, input_ids: torch.Tensor, loops: int) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, loops: int) -> object:
        raise NotImplementedError

    def decode_step(self, token: torch.Tensor, cache: object, loops: int) -> torch.Tensor:
        raise NotImplementedError


def _random_kv(batch: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, PROMPT_TOKENS, head_dim)
    return tuple(torch.randn(shape, generator=generator).to(dtype) for _ in range(2))


class Ours(Contender):
    name = "ours"

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.dtype = next(model.parameters()).dtype

    def prefill(self, input_ids, loops):
        return self.model(input_ids, num_loops=loops, use_cache=False).logits

    def new_cache(self, batch, loops):
        cache = DynamicCache()
        prepare_cache(cache, ParcaeSlotMap.for_config(self.config, loops))  # bound to the loop count, as a forward does
        for slot in range(executed_depth(self.config, loops)):
            cache.update(*_random_kv(batch, self.config.num_key_value_heads, self.config.head_dim, self.dtype, slot),
                         slot)
        return cache

    def decode_step(self, token, cache, loops):
        logits = self.model(token, cache=cache, num_loops=loops, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1:].argmax(-1)


class UnrolledLlama(Contender):
    name = "llama"

    def __init__(self, model, parcae_config):
        self.model, self.parcae_config = model, parcae_config
        self.dtype = next(model.parameters()).dtype

    def prefill(self, input_ids, loops):
        set_llama_depth(self.model, executed_depth(self.parcae_config, loops))
        return self.model(input_ids, use_cache=False).logits

    def new_cache(self, batch, loops):
        set_llama_depth(self.model, executed_depth(self.parcae_config, loops))
        cache = DynamicCache(config=self.model.config)
        config = self.model.config
        for layer in range(config.num_hidden_layers):
            cache.update(*_random_kv(batch, config.num_key_value_heads, config.head_dim, self.dtype, layer), layer)
        return cache

    def decode_step(self, token, cache, loops):
        set_llama_depth(self.model, executed_depth(self.parcae_config, loops))
        logits = self.model(token, cache=cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1:].argmax(-1)


class Official(Contender):
    """The official ``ModelingParcae``: ``forward`` for prefill, ``forward_for_generation`` (what its ``generate``
    calls per token) with its ``ParcaeDynamicCache`` for decode."""

    name = "official"

    def __init__(self, model, parcae_config):
        self.model, self.parcae_config = model, parcae_config
        self.dtype = next(model.parameters()).dtype

    def prefill(self, input_ids, loops):
        return self.model(input_ids, num_steps_pair=torch.tensor([loops, 0]), return_logits=True)["logits"]

    def new_cache(self, batch, loops):
        cache = self.model.create_cache(num_steps=loops)
        config = self.parcae_config
        for slot in range(executed_depth(config, loops)):  # official slot order: prelude, loops x core, coda
            cache.update(*_random_kv(batch, config.num_key_value_heads, config.head_dim, self.dtype, slot),
                         torch.tensor(slot))
        return cache

    def decode_step(self, token, cache, loops):
        logits = self.model.forward_for_generation(token, num_steps=loops, past_key_values=cache)["logits"]
        return logits[:, -1:].argmax(-1)


# -- measurement -----------------------------------------------------------------------------------------------------

class LoadLog:
    """Samples the 1-minute load average, so the JSON says how busy the machine was while it measured."""

    def __init__(self):
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def summary(self, threads: int) -> dict:
        cores = os.cpu_count() or 1
        # this benchmark itself accounts for ~``threads`` runnable threads; more than the cores means others run too
        loaded = max(self.samples, default=0.0) > max(cores, threads) + 0.5
        return dict(loadavg_1min_samples=self.samples, max_loadavg_1min=max(self.samples, default=None),
                    machine_loaded=loaded,
                    loaded_rule=f"max 1-min load average > max(cores={cores}, threads={threads}) + 0.5")


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def timed_call(call: Callable[[], object]) -> tuple[object, tuple[float, float]]:
    """The call's result and its (wall, process CPU) seconds. On a machine shared with other processes the CPU time
    (all threads of this process) moves much less with the load than the wall time."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def timed_row(times: list[tuple[float, float]], peak: int | None) -> dict:
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    return dict(median_s=statistics.median(wall), min_s=min(wall), times_s=wall,
                cpu_median_s=statistics.median(cpu), cpu_times_s=cpu,
                peak_mb=peak / 2**20 if peak is not None else None)


def bench_prefill(contenders: list[Contender], vocab: int, loops_list: list[int], repeats: int,
                  load: LoadLog) -> dict[int, dict[str, dict]]:
    """Timed repeats (interleaved), then one more call per model and loop count that measures peak memory."""
    input_ids = torch.randint(3, vocab, (PREFILL_BATCH, PREFILL_TOKENS), generator=torch.Generator().manual_seed(0))
    times = {loops: {c.name: [] for c in contenders} for loops in loops_list}
    with torch.no_grad():
        for contender in contenders:  # warm-up: first-call allocations and kernel selection
            contender.prefill(input_ids, min(loops_list))
        for repeat in range(repeats):
            load.sample()
            for loops in loops_list:
                for contender in _rotated(contenders, repeat + loops):
                    times[loops][contender.name].append(timed_call(lambda: contender.prefill(input_ids, loops))[1])
            print(f"    prefill repeat {repeat + 1}/{repeats} done", flush=True)
        return {loops: {c.name: timed_row(times[loops][c.name],
                                     peak_memory.peak_bytes(lambda: c.prefill(input_ids, loops)))
                        for c in contenders}
                for loops in loops_list}


def bench_decode(contenders: list[Contender], vocab: int, batch: int, loops: int, steps: int,
                 load: LoadLog) -> dict[str, dict]:
    """``steps`` decode steps per model, interleaved step by step, after one untimed warm-up step each, then one
    more step per model that measures peak memory."""
    load.sample()
    first = torch.randint(3, vocab, (batch, 1), generator=torch.Generator().manual_seed(1))
    caches = {c.name: c.new_cache(batch, loops) for c in contenders}
    times = {c.name: [] for c in contenders}
    with torch.no_grad():
        tokens = {c.name: c.decode_step(first, caches[c.name], loops) for c in contenders}
        for step in range(steps):
            for contender in _rotated(contenders, step):
                name = contender.name
                tokens[name], timing = timed_call(lambda: contender.decode_step(tokens[name], caches[name], loops))
                times[name].append(timing)
        return {c.name: timed_row(times[c.name],
                             peak_memory.peak_bytes(lambda: c.decode_step(tokens[c.name], caches[c.name], loops)))
                for c in contenders}


def ratios_over_others(row: dict[str, dict]) -> dict:
    """Ours over each other model: ratio of wall-time medians, median of the ratios of runs made back to back (the
    i-th timed run of each model shares one repeat, hence the machine's load at that moment), ratio of CPU-time
    medians."""
    ratios = {}
    for other in ("llama", "official"):
        if other in row:
            ours, theirs = row["ours"], row[other]
            ratios[f"ours_over_{other}"] = ours["median_s"] / theirs["median_s"]
            ratios[f"ours_over_{other}_paired"] = statistics.median(
                a / b for a, b in zip(ours["times_s"], theirs["times_s"]))
            ratios[f"ours_over_{other}_cpu"] = ours["cpu_median_s"] / theirs["cpu_median_s"]
    return ratios


# -- main ------------------------------------------------------------------------------------------------------------

def save_report(report: dict, path: Path) -> None:
    """The JSON report, written whole or not at all (a killed run leaves the previous results in place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(report, indent=2) + "\n"))


def add_shared_arguments(parser: argparse.ArgumentParser, output: Path) -> None:
    """``--dtypes``, ``--threads`` and ``--output``, as the benchmarks built on this one take them."""
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=output)


def machine_line(report: dict) -> str:
    """The line under a benchmark's table: the machine, how loaded it was, how long the run took."""
    load, machine = report["load"], report["machine"]
    return (f"\nmachine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads; "
            f"max 1-min load {load['max_loadavg_1min']:.2f} (loaded: {load['machine_loaded']}); "
            f"{report['wall_seconds']:.0f} s")


def save_and_show(report: dict, path: Path, print_table: Callable[[dict], None]) -> int:
    """Where a benchmark's ``main`` ends: the JSON saved, its table printed, and where it went."""
    save_report(report, path)
    print_table(report)
    print(f"wrote {path}")
    return 0


def machine_description(threads: int) -> dict:
    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return dict(cpu=model_name, cores=os.cpu_count(), torch_threads=threads, memory_gib=round(memory_gib, 1),
                platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    memory_problem = peak_memory.enable()
    official_class, official_problem = (None, "--no-official given") if args.no_official else import_official()
    if official_problem:
        print(f"official column skipped: {official_problem}", flush=True)
    load = LoadLog()
    started = time.perf_counter()
    results = []
    for preset in args.presets:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            ours_model = build_parcae(preset, dtype)
            config = ours_model.config
            contenders: list[Contender] = [
                Ours(ours_model),
                UnrolledLlama(build_llama(config, executed_depth(config, max(args.loops)), dtype), config),
            ]
            if official_class is not None:
                contenders.append(Official(build_official(official_class, ours_model), config))
            print(f"{preset} {dtype_name}: {', '.join(c.name for c in contenders)}", flush=True)
            if "prefill" in args.modes:
                for loops, row in bench_prefill(contenders, config.vocab_size, args.loops, args.repeats,
                                                load).items():
                    results.append(dict(preset=preset, dtype=dtype_name, mode="prefill", batch=PREFILL_BATCH,
                                        tokens=PREFILL_TOKENS, loops=loops, llama_layers=executed_depth(config, loops),
                                        models=row, **ratios_over_others(row)))
            if "decode" in args.modes:
                for batch in args.decode_batches:
                    for loops in args.loops:
                        row = bench_decode(contenders, config.vocab_size, batch, loops, args.decode_steps, load)
                        results.append(dict(preset=preset, dtype=dtype_name, mode="decode", batch=batch,
                                            prompt_tokens=PROMPT_TOKENS, loops=loops,
                                            llama_layers=executed_depth(config, loops), models=row,
                                            **ratios_over_others(row)))
                        print(f"    decode B={batch} loops={loops} done", flush=True)
            del contenders, ours_model
    load.sample()
    return dict(
        benchmark="released_shapes", machine=machine_description(args.threads), load=load.summary(args.threads),
        wall_seconds=time.perf_counter() - started,
        settings=dict(presets=args.presets, dtypes=args.dtypes, loops=args.loops, modes=args.modes,
                      repeats=args.repeats, decode_steps=args.decode_steps, decode_batches=args.decode_batches,
                      prefill_batch=PREFILL_BATCH, prefill_tokens=PREFILL_TOKENS, prompt_tokens=PROMPT_TOKENS),
        official_skipped=official_problem, peak_memory_unavailable=memory_problem,
        peak_memory_definition="resident memory one extra untimed call adds: peak VmHWM during it minus VmRSS "
                               "before it, one mapping per buffer (see benchmarks/peak_memory.py); decode: one step "
                               "on top of the 256-token cache",
        results=results,
    )


def print_table(report: dict) -> None:
    """Median wall seconds (peak MB) per model; ratios: of wall medians (median of back-to-back ratios) [of CPU
    medians]."""
    others = ["llama"] + (["official"] if report["official_skipped"] is None else [])
    header = ("| preset | dtype | mode | B | loops | ours s (MB) | " + " | ".join(f"{o} s (MB)" for o in others)
              + " | " + " | ".join(f"ours/{o} (paired) [cpu]" for o in others) + " |")
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))

    def cell(model: dict) -> str:
        peak = f"{model['peak_mb']:.0f}" if model["peak_mb"] is not None else "?"
        return f"{model['median_s']:.3f} ({peak})"

    for row in report["results"]:
        cells = [cell(row["models"][name]) for name in ["ours", *others]]
        cells += [f"{row[f'ours_over_{o}']:.3f} ({row[f'ours_over_{o}_paired']:.3f}) [{row[f'ours_over_{o}_cpu']:.3f}]"
                  for o in others]
        print(f"| {row['preset']} | {row['dtype']} | {row['mode']} | {row['batch']} | {row['loops']} | "
              + " | ".join(cells) + " |")
    print(machine_line(report))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["parcae-140m", "parcae-370m"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--loops", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--modes", nargs="+", choices=["prefill", "decode"], default=["prefill", "decode"])
    parser.add_argument("--decode-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved prefill repeats (median reported)")
    parser.add_argument("--decode-steps", type=int, default=5, help="timed decode steps per model and setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-official", action="store_true", help="skip the official column")
    parser.add_argument("--quick", action="store_true",
                        help="smoke subset: parcae-140m, 8 loops, 2 repeats, 3 decode steps (unless given explicitly)")
    parser.add_argument("--output", type=Path, help="JSON path (default results/released_shapes[_quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        if "--presets" not in given:
            args.presets = ["parcae-140m"]
        if "--loops" not in given:
            args.loops = [8]
        if "--repeats" not in given:
            args.repeats = 2
        if "--decode-steps" not in given:
            args.decode_steps = 3
    if args.output is None:
        args.output = RESULTS / ("released_shapes_quick.json" if args.quick else "released_shapes.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return save_and_show(run(args), args.output, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
