"""One GPU run (<= 6 minutes on one H200-class GPU): training step and inference, ours vs the official class vs an
unrolled Llama, eager and compiled. ``--smoke`` runs every section at toy shapes on CPU in seconds (a test runs it).

Training step (forward + cross-entropy + backward, no optimizer) at the parcae-140m shape, random N(0, 0.02)
weights, batch 8 x 2048, 4 no-grad + 4 gradient loops, bf16 autocast over fp32 weights (the ``parcae train`` and
official recipes), flash SDPA where the GPU has it:

* ours eager; ours under a whole-model ``torch.compile`` (what ``TrainingArguments(torch_compile=True)`` does; in
  training the loop stays in Python and its stages compile); ours with every block compiled
  (``modeling_parcae.compilation.compile_blocks``) and the head's loss eager; ours with the blocks and the loss
  compiled (``compile_loss``: ``parcae train --compile``); the chunked head + loss (``chunked_loss.py``) on the
  compiled blocks;
* the official class (``PARCAE_OFFICIAL_SRC``; skipped with the reason without it), eager and compiled as its
  training recipe runs (``OFFICIAL_RECIPE``, recorded in the JSON; official ``scripts/train.py:94-123`` and
  ``:396-404`` with the ``recpre/settings.py`` defaults its launch configs keep): the whole model compiled by inductor
  in mode "default", ``dynamic=False``, under TF32, flash / memory-efficient SDPA only and its inductor, functorch
  and dynamo globals (``emulate_precision_casts``, ...), set around the official rows only (they run after ours)
  and restored after them; and, the baseline issue 20's goal names, the official class with every block compiled on
  its own (the recipe's opt-in "selective" backend) under the same settings.

Per row: ms/step (median of the timed steps), tokens/s, peak allocated memory, model FLOP/s (FLOPs of one step as
``torch.utils.flop_counter`` counts them on ours eager: matmuls and attention, forward and backward as executed) and
its fraction of the device's bf16 matmul peak, measured here (an 8192^3 bf16 matmul).

Inference at the same shape (batch 8 x 2048 prefill with full logits; greedy decode at batch 1 after a 512-token
prompt), ours vs the unrolled Llama that executes as many blocks (``released_models.py``): eager, and compiled —
ours block by block (regional), Llama as one whole-model graph (its usual compile) — with the compile time of the
first call and the graphs compiled when ``num_loops`` changes (Llama: when its executed depth changes).
``--whole-model`` adds ours compiled as one unrolled graph (minutes of compile: outside the 6-minute budget).

    PARCAE_OFFICIAL_SRC=/path/to/official python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --smoke          # CPU, toy shapes, a few seconds per section
    python benchmarks/bench_gpu.py --smoke --sections inference --preset parcae-140m --backend inductor \
        --out benchmarks/results/compile_cpu.json   # CPU compile times, regional vs whole-model Llama
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from functools import reduce
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn.functional as F
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from released_models import (
    build_llama, build_official, build_parcae, executed_depth, import_official, set_llama_depth,
)
from modeling_parcae import ParcaeConfig, ParcaeForCausalLM
from modeling_parcae.atomic import write_atomically
from modeling_parcae.chunked_loss import chunked_linear_cross_entropy
from modeling_parcae.compilation import compile_blocks, compile_loss

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
FULL = dict(preset="parcae-140m", batch=8, seq_len=2048, no_grad=4, grad=4, timed_steps=5, matmul=8192,
            decode_prompt=512, decode_steps=32, loops=8, other_loops=4, backend="inductor")
# aot_eager: the smoke run exercises capture, graphs and recompile counting, not inductor's C++ builds (minutes on CPU)
SMOKE = dict(preset=None, batch=2, seq_len=32, no_grad=1, grad=1, timed_steps=2, matmul=256,
             decode_prompt=16, decode_steps=3, loops=2, other_loops=3, backend="aot_eager")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - started


def peak_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocated memory during one call (CUDA caching allocator statistics; None on CPU)."""
    if device.type != "cuda":
        call()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    call()
    synchronize(device)
    return torch.cuda.max_memory_allocated()


def guarded(what: str, call: Callable[[], dict]) -> dict:
    """``call()``, or a dict naming its error: one failing measurement (an OOM, a compile error) must not cost the
    others of a run that is hard to repeat."""
    try:
        return call()
    except Exception as error:
        message = f"{type(error).__name__}: {error}"[:2000]
        log(f"  {what} failed: {message[:300]}")
        return dict(error=message)


def failures(report) -> int:
    """How many measurements of the report failed (dicts with an ``error`` key, at any depth)."""
    if isinstance(report, dict):
        return ("error" in report) + sum(failures(value) for value in report.values())
    return 0


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def bf16_matmul_peak(size: int, device: torch.device) -> float:
    """FLOP/s of a large square bf16 matmul, the best of several timed runs (the device's practical peak)."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    repeats = 20 if device.type == "cuda" else 2
    best = min(timed(lambda: [a @ b for _ in range(repeats)], device) for _ in range(3))
    return 2 * size**3 * repeats / best


def toy_model(dtype: torch.dtype) -> ParcaeForCausalLM:
    config = ParcaeConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                          num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, max_position_embeddings=128)
    torch.manual_seed(0)
    return ParcaeForCausalLM(config).to(dtype)


# -- training step ---------------------------------------------------------------------------------------------------

def ours_step(model, rows: torch.Tensor, loops: tuple[int, int], chunked: bool, autocast) -> Callable[[], None]:
    """``parcae train``'s step: inputs ``rows[:, :-1]``, targets ``rows[:, 1:]``, mean cross-entropy."""
    def step() -> None:
        with autocast():
            if chunked:
                hidden = model.model(rows[:, :-1], num_loops=loops, use_cache=False).last_hidden_state
                loss = chunked_linear_cross_entropy(hidden, model.lm_head.weight, rows[:, 1:])
            else:
                logits = model(rows[:, :-1], num_loops=loops, use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def official_step(model, rows: torch.Tensor, loops: tuple[int, int], autocast) -> Callable[[], None]:
    def step() -> None:
        with autocast():  # the official forward takes targets already shifted
            loss = model(rows[:, :-1], labels=rows[:, 1:].contiguous(),
                         num_steps_pair=torch.tensor(list(loops)))["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


# The official training recipe as its launch configs run it (``launch_configs/parcae-*.yaml``: ``compile_model:
# True`` and no other compile key, so the defaults of ``recpre/settings.py:152-163`` hold). ``scripts/train.py``
# compiles the whole model; not ``recpre/utils.py``'s ``max-autotune-no-cudagraphs`` (``train.py:335`` sets Fabric up
# with ``compile=False``) nor the opt-in "selective" per-block backend. Its loop (``Parcae.iterate_forward``) is
# dynamo-disabled non-recursively, so the prelude, the recurrence step (adapter + core blocks: one graph reused by
# every step, one per grad mode) and coda + loss are graphs of their own.
# Ours keep ``parcae train``'s defaults (no TF32: its autocast matmuls are bf16 anyway; flash SDPA on these shapes
# either way). Left out: the DDP wrapper (``train.py:168``), which a one-GPU step does not need.
OFFICIAL_RECIPE = {
    "torch.compile(model)": dict(backend="inductor", mode="default", fullgraph=False,  # train.py:396-404
                                 dynamic=False),
    "float32_matmul_precision": "high",  # train.py:95 (settings.py:156)
    "torch.backends": {"cudnn.benchmark": True, "cudnn.allow_tf32": True, "cuda.matmul.allow_tf32": True,
                       "cuda.matmul.allow_fp16_reduced_precision_reduction": True},  # train.py:96-99
    "sdpa_backends": ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"],  # train.py:100-106: math and cuDNN SDPA off
    "torch._dynamo.config": dict(optimize_ddp="ddp_optimizer", compiled_autograd=False,  # train.py:108-109
                                 cache_size_limit=64, suppress_errors=False),  # train.py:119-120
    "torch._inductor.config": {"emulate_precision_casts": True, "triton.cudagraphs": False,  # train.py:114-117
                               "coordinate_descent_tuning": False, "fx_graph_cache": False},
    "torch._functorch.config": dict(donated_buffer=False),  # train.py:118
}
CONFIG_MODULES = ("torch._dynamo.config", "torch._inductor.config", "torch._functorch.config")


@contextmanager
def official_recipe():
    """The official recipe's process-wide settings, restored on exit so that they never reach our rows. Held over
    the compile (the first step) and the timed steps alike: inductor reads its config when it compiles, the SDPA
    and TF32 flags are read when the graph is traced and when it runs."""
    with ExitStack() as stack:
        for name in CONFIG_MODULES:
            stack.enter_context(importlib.import_module(name).patch(OFFICIAL_RECIPE[name]))
        stack.enter_context(sdpa_kernel([getattr(SDPBackend, name) for name in OFFICIAL_RECIPE["sdpa_backends"]]))
        stack.callback(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision())
        torch.set_float32_matmul_precision(OFFICIAL_RECIPE["float32_matmul_precision"])
        for path, value in OFFICIAL_RECIPE["torch.backends"].items():
            *owner, name = path.split(".")
            owner = reduce(getattr, owner, torch.backends)
            stack.callback(setattr, owner, name, getattr(owner, name))
            setattr(owner, name, value)
        yield


def compile_official_blocks(official: torch.nn.Module, options: dict) -> torch.nn.Module:
    """The official "selective" compile backend (``scripts/train.py:337-347``): each prelude, core and coda block
    compiled on its own with the recipe's options, the loop and the head left eager."""
    for name in ("prelude", "core_block", "coda"):
        blocks = getattr(official.transformer, name)
        setattr(official.transformer, name, torch.nn.ModuleList([torch.compile(block, **options) for block in blocks]))
    return official


def training_row(step: Callable[[], None], steps: int, tokens: int, flops: float, peak_flops: float,
                 device: torch.device) -> dict:
    started = time.perf_counter()
    step()  # warm-up: compiles the compiled variants
    warmup = time.perf_counter() - started
    step()
    times = [timed(step, device) for _ in range(steps)]
    peak = peak_bytes(step, device)
    median = statistics.median(times)
    return dict(ms_per_step=1000 * median, times_ms=[1000 * t for t in times], tokens_per_s=tokens / median,
                peak_gib=peak / 2**30 if peak is not None else None, first_step_s=warmup,
                model_tflop_per_s=flops / median / 1e12, fraction_of_bf16_peak=flops / median / peak_flops)


def bench_training(settings: dict, device: torch.device, peak_flops: float, official_class) -> dict:
    build = (lambda: build_parcae(settings["preset"], torch.float32)) if settings["preset"] else \
        (lambda: toy_model(torch.float32))
    ours = build().to(device).train()
    rows = torch.randint(3, ours.config.vocab_size, (settings["batch"], settings["seq_len"] + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)
    loops = (settings["no_grad"], settings["grad"])
    tokens = settings["batch"] * settings["seq_len"]

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    with FlopCounterMode(display=False) as counter:
        ours_step(ours, rows, loops, False, autocast)()
    flops = counter.get_total_flops()
    rows_out = {}

    def run(name: str, step: Callable[[], None]) -> None:
        log(f"training: {name}")
        rows_out[name] = guarded(name, lambda: training_row(step, settings["timed_steps"], tokens, flops, peak_flops,
                                                            device))
        if "error" not in rows_out[name]:
            log(f"  {rows_out[name]['ms_per_step']:.1f} ms/step, first step {rows_out[name]['first_step_s']:.1f} s")

    # every row holds the same weight tensors (compiled in place; the official class shares ours), so the peaks differ
    # by activations, gradients and workspace only
    run("ours eager", ours_step(ours, rows, loops, False, autocast))
    # what TrainingArguments(torch_compile=True) does: in training the loop stays in Python, its stages compile
    run("ours torch.compile(model)", ours_step(torch.compile(ours, backend=settings["backend"], dynamic=False), rows,
                                               loops, False, autocast))
    compile_blocks(ours, backend=settings["backend"], dynamic=False)
    run("ours compiled blocks, eager loss", ours_step(ours, rows, loops, False, autocast))
    compile_loss(ours, backend=settings["backend"], dynamic=False)  # now as `parcae train --compile`
    run("ours compiled", ours_step(ours, rows, loops, False, autocast))
    run("ours compiled, chunked loss", ours_step(ours, rows, loops, True, autocast))
    recipe = None
    if official_class is not None:
        official = build_official(official_class, ours).to(device).train()
        # as recorded: the recipe but for the backend (the smoke run's aot_eager)
        recipe = OFFICIAL_RECIPE | {"torch.compile(model)": OFFICIAL_RECIPE["torch.compile(model)"] | dict(
            backend=settings["backend"])}
        with official_recipe():
            run("official eager", official_step(official, rows, loops, autocast))
            compiled = torch.compile(official, **recipe["torch.compile(model)"])
            run("official compiled", official_step(compiled, rows, loops, autocast))
            # the issue-20 goal's baseline ("every block compiled"): the opt-in "selective" backend, a fresh
            # instance on the same weights, under the same settings
            per_block = compile_official_blocks(build_official(official_class, ours).to(device).train(),
                                                recipe["torch.compile(model)"])
            run("official blocks compiled", official_step(per_block, rows, loops, autocast))
        del official, compiled, per_block
    del ours
    torch._dynamo.reset()
    result = dict(model_flops_per_step=flops, rows=rows_out, official_recipe=recipe)
    for baseline in ("official compiled", "official blocks compiled"):
        if "ms_per_step" not in rows_out.get(baseline, {}):
            continue
        for name in ("ours compiled", "ours compiled blocks, eager loss", "ours torch.compile(model)",
                     "ours compiled, chunked loss"):
            if "ms_per_step" not in rows_out[name]:
                continue
            result[f"{name} / {baseline}"] = dict(
                time=rows_out[name]["ms_per_step"] / rows_out[baseline]["ms_per_step"],
                memory=(rows_out[name]["peak_gib"] / rows_out[baseline]["peak_gib"]
                        if rows_out[name]["peak_gib"] else None))
    return result


# -- inference -------------------------------------------------------------------------------------------------------

def prefill_row(call: Callable[[int], object], loops: int, other_loops: int, tokens: int, device) -> dict:
    """First call (compile included), median of 3 timed calls, then a call at ``other_loops`` and the graphs it
    compiled."""
    graphs = graphs_compiled()
    first = timed(lambda: call(loops), device)
    times = [timed(lambda: call(loops), device) for _ in range(3)]
    compiled_first = graphs_compiled() - graphs
    graphs = graphs_compiled()
    other_first = timed(lambda: call(other_loops), device)
    median = statistics.median(times)
    return dict(ms=1000 * median, tokens_per_s=tokens / median, first_call_s=first, graphs_compiled=compiled_first,
                graphs_compiled_at_other_loops=graphs_compiled() - graphs, first_call_at_other_loops_s=other_first)




def decode_rate(model, prompt: torch.Tensor, loops: int | None, steps: int, device) -> float:
    """Greedy tokens/s of ``steps`` cached decode steps after a prefill (``loops=None``: a Llama), each model with
    the cache its own forward builds."""
    extra = {} if loops is None else {"num_loops": loops}
    output = model(prompt, use_cache=True, logits_to_keep=1, **extra)
    name = "cache" if "cache" in output else "past_key_values"  # transformers 5.24 renamed it
    extra[name] = output[name]
    token = output.logits[:, -1:].argmax(-1)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        logits = model(token, use_cache=True, logits_to_keep=1, **extra).logits
        token = logits[:, -1:].argmax(-1)
    synchronize(device)
    return steps / (time.perf_counter() - started)


def bench_inference(settings: dict, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours = (build_parcae(settings["preset"], dtype) if settings["preset"] else toy_model(dtype)).to(device)
    config = ours.config
    loops, other = settings["loops"], settings["other_loops"]
    llama = build_llama(config, executed_depth(config, max(loops, other)), dtype).to(device)
    batch = torch.randint(3, config.vocab_size, (settings["batch"], settings["seq_len"]),
                          generator=torch.Generator().manual_seed(1)).to(device)
    prompt = batch[:1, :settings["decode_prompt"]]
    tokens, steps = batch.numel(), settings["decode_steps"]

    def ours_prefill(n):
        return ours(batch, num_loops=n, use_cache=False).logits

    def llama_prefill_of(model):
        def call(n):
            set_llama_depth(llama, executed_depth(config, n))
            return model(batch, use_cache=False).logits
        return call

    def llama_decode():
        set_llama_depth(llama, executed_depth(config, loops))
        return decode_rate(llama, prompt, None, steps, device)

    def regional_decode() -> dict:
        """Compiles the cached variants (a growing cache: its length becomes dynamic), then times, then changes
        ``num_loops``; the graphs compiled in each phase."""
        graphs, started = graphs_compiled(), time.perf_counter()
        decode_rate(ours, prompt, loops, 2, device)
        row = dict(first_run_s=time.perf_counter() - started, graphs_first_run=graphs_compiled() - graphs)
        graphs = graphs_compiled()
        row["tokens_per_s"] = decode_rate(ours, prompt, loops, steps, device)
        row["graphs_timed_run"] = graphs_compiled() - graphs
        graphs = graphs_compiled()
        decode_rate(ours, prompt, other, steps, device)
        row["graphs_at_other_loops"] = graphs_compiled() - graphs
        return row

    prefill, decode = {}, {}
    with torch.no_grad():
        log("inference: eager prefill and decode")
        prefill["ours eager"] = guarded("prefill", lambda: prefill_row(ours_prefill, loops, other, tokens, device))
        prefill["llama eager"] = guarded("prefill", lambda: prefill_row(llama_prefill_of(llama), loops, other,
                                                                        tokens, device))
        decode["ours eager"] = guarded("decode", lambda: dict(
            tokens_per_s=decode_rate(ours, prompt, loops, steps, device)))
        decode["llama eager"] = guarded("decode", lambda: dict(tokens_per_s=llama_decode()))

        log("inference: llama whole-model compile")
        torch._dynamo.reset()
        whole = torch.compile(llama, backend=settings["backend"])
        prefill["llama compiled (whole model)"] = guarded("prefill", lambda: prefill_row(
            llama_prefill_of(whole), loops, other, tokens, device))
        torch._dynamo.reset()

        if settings.get("whole_model"):
            log("inference: ours whole-model compile (the unrolled loop)")
            whole_ours = torch.compile(ours, backend=settings["backend"])
            prefill["ours compiled (whole model)"] = guarded("prefill", lambda: prefill_row(
                lambda n: whole_ours(batch, num_loops=n, use_cache=False).logits, loops, other, tokens, device))
            torch._dynamo.reset()

        log("inference: ours regional compile, prefill")
        compile_blocks(ours, backend=settings["backend"])
        prefill["ours compiled (regional)"] = guarded("prefill", lambda: prefill_row(ours_prefill, loops, other,
                                                                                     tokens, device))
        log("inference: ours regional compile, decode")
        decode["ours compiled (regional)"] = guarded("decode", regional_decode)
        torch._dynamo.reset()
    result = dict(prefill=prefill, decode=decode)
    result["ours/llama"] = guarded("ratios", lambda: dict(
        eager_prefill_time=prefill["ours eager"]["ms"] / prefill["llama eager"]["ms"],
        compiled_prefill_time=prefill["ours compiled (regional)"]["ms"] / prefill["llama compiled (whole model)"]["ms"],
        compile_time=(prefill["ours compiled (regional)"]["first_call_s"]
                      / prefill["llama compiled (whole model)"]["first_call_s"]),
        eager_decode_time=decode["llama eager"]["tokens_per_s"] / decode["ours eager"]["tokens_per_s"]))
    if "ours compiled (whole model)" in prefill:
        result["ours regional/whole model"] = guarded("ratios", lambda: dict(
            prefill_time=prefill["ours compiled (regional)"]["ms"] / prefill["ours compiled (whole model)"]["ms"],
            compile_time=(prefill["ours compiled (regional)"]["first_call_s"]
                          / prefill["ours compiled (whole model)"]["first_call_s"])))
    return result


def versions(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), cpu_cores=os.cpu_count(),
                torch=torch.__version__, transformers=transformers.__version__)
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy shapes on CPU, every section, a few seconds each")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS}, smoke: gpu_smoke.json)")
    parser.add_argument("--sections", nargs="+", choices=["training", "inference"], default=["training", "inference"])
    parser.add_argument("--preset", help="model preset instead of the mode's (smoke: a toy model)")
    parser.add_argument("--whole-model", action="store_true",
                        help="also compile our whole unrolled forward (the reference regional compile is measured "
                             "against; its compile takes minutes on a GPU, beyond the 6-minute budget)")
    parser.add_argument("--backend", help="torch.compile backend instead of the mode's (smoke: aot_eager), e.g. "
                                          "inductor to measure CPU compile times at smoke shapes")
    args = parser.parse_args(argv)
    settings = dict(SMOKE if args.smoke else FULL)
    settings.update({key: value for key, value in (("preset", args.preset), ("backend", args.backend),
                                                   ("whole_model", args.whole_model)) if value})
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    output = args.out or RESULTS.with_name("gpu_smoke.json" if args.smoke else "gpu.json")
    # compile times from scratch: no kernels or graphs reused from an earlier run's on-disk caches
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    started = time.perf_counter()
    official_class, official_problem = import_official()
    if official_problem:
        log(f"official rows skipped: {official_problem}")
    log(f"device {device}: measuring the bf16 matmul peak")
    peak = bf16_matmul_peak(settings["matmul"], device)
    log(f"  {peak / 1e12:.1f} TFLOP/s")
    report = dict(benchmark="gpu", smoke=args.smoke, machine=versions(device), settings=settings,
                  bf16_matmul_peak_tflop_per_s=peak / 1e12, official_skipped=official_problem)
    sections = {"training": lambda: bench_training(settings, device, peak, official_class),
                "inference": lambda: bench_inference(settings, device)}
    for name in args.sections:
        report[name] = guarded(name, sections[name])
        report["wall_seconds"] = time.perf_counter() - started
        # after each section, whole or not at all: a run cut short keeps what it measured
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(output, lambda temporary: temporary.write_text(json.dumps(report, indent=2) + "\n"))
    for name, row in report.get("training", {}).get("rows", {}).items():
        if "error" in row:
            print(f"{name:>30}: failed ({row['error'][:100]})")
            continue
        memory = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "-"
        print(f"{name:>30}: {row['ms_per_step']:8.1f} ms/step  {row['tokens_per_s']:10.0f} tok/s  {memory:>9}  "
              f"{row['model_tflop_per_s']:7.1f} TFLOP/s  {100 * row['fraction_of_bf16_peak']:5.1f}% of peak")
    for mode in ("prefill", "decode"):
        for name, row in report.get("inference", {}).get(mode, {}).items():
            if "error" in row:
                print(f"{mode + ' ' + name:>38}: failed ({row['error'][:100]})")
                continue
            print(f"{mode + ' ' + name:>38}: {row['tokens_per_s']:10.0f} tok/s" + (
                f", first call {row['first_call_s']:.1f} s, graphs at other num_loops "
                f"{row['graphs_compiled_at_other_loops']}" if mode == "prefill" else ""))
    failed = failures(report)
    log(f"done in {report['wall_seconds']:.0f} s, {failed} failed measurement(s); wrote {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
