"""Output tokens/s of vLLM serving a Parcae model vs transformers' batched ``generate``, in the serve environment.

Two shapes: the bundled demo (its weights) and parcae-140m (configuration/presets, random weights, saved with its
remote code), both fp32, vLLM with ``enforce_eager=True``. For 1, 8 and 32 requests submitted at once (prompts of 16 to
128 random token ids, fixed seed) and two traffic shapes: ``uniform`` (every request 64 new tokens) and ``varied``
(budgets drawn from 8 to 128). transformers runs the left-padded batch to its longest budget; only the tokens each
request asked for are counted on both sides. Each side runs in a process of its own (vLLM's Transformers backend
replaces layer classes in place), the same requests on both, after a warm-up; the ratio is vLLM / transformers.

    .../serve-env/bin/python -P benchmarks/bench_serving.py            # writes benchmarks/results/serving.json
    .../serve-env/bin/python -P benchmarks/bench_serving.py --smoke --out /tmp/s.json   # toy sizes, one shape
    .../serve-env/bin/python -P benchmarks/bench_serving.py --profile  # where the time goes at 140m, 32 requests

(``.ci/serve_lane.py`` builds the environment; docs/performance.md, "Serving", has the figures.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: it is what is timed
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: 32 requests x 256 tokens x 20 executed blocks at 140m

import torch  # noqa: E402

from bench_released_shapes import machine_description  # noqa: E402
from released_models import build_parcae  # noqa: E402
from modeling_parcae import ParcaeForCausalLM  # noqa: E402
from modeling_parcae.atomic import write_atomically  # noqa: E402
from modeling_parcae.bundled import demo_model_path  # noqa: E402

MAX_MODEL_LEN = 256
FULL = {"requests": (1, 8, 32), "prompt": (16, 128), "uniform": 64, "varied": (8, 128), "shapes": ("demo", "140m")}
SMOKE = {"requests": (1, 4), "prompt": (4, 12), "uniform": 4, "varied": (2, 8), "shapes": ("demo",)}


def workload(sizes: dict, vocab_size: int, requests: int, traffic: str, seed: int = 0) -> list[dict]:
    """The requests of one row: random prompts (ids 3.. to skip the special tokens) and their new-token budgets."""
    rng = random.Random(f"{seed}-{requests}-{traffic}")
    rows = []
    for _ in range(requests):
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(*sizes["prompt"]))]
        budget = sizes["uniform"] if traffic == "uniform" else rng.randint(*sizes["varied"])
        rows.append({"prompt": prompt, "budget": budget})
    return rows


def transformers_side(folder: Path):
    """Batched greedy ``generate`` of a request set (left-padded, run to the longest budget)."""
    model = ParcaeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def generate(requests: list[dict]) -> None:
        width = max(len(request["prompt"]) for request in requests)
        ids = torch.tensor([[0] * (width - len(r["prompt"])) + r["prompt"] for r in requests])
        mask = torch.tensor([[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"]) for r in requests])
        longest = max(request["budget"] for request in requests)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == width + longest

    return generate


def vllm_side(folder: Path):
    """One ``LLM.generate`` call holding all of a request set's requests."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(folder), model_impl="transformers", trust_remote_code=True, dtype="float32",
              enforce_eager=True, max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True, seed=0)

    def generate(requests: list[dict]) -> None:
        params = [SamplingParams(temperature=0.0, max_tokens=r["budget"], ignore_eos=True, detokenize=False)
                  for r in requests]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt"]) for r in requests], params,
                               use_tqdm=False)
        assert [len(output.outputs[0].token_ids) for output in outputs] == [r["budget"] for r in requests]

    return generate


def time_rows(generate, plan: list[dict]) -> list[tuple[float, float]]:
    """Warm up on the first row (one-off start costs), then time each row once: wall and process CPU seconds (on a
    shared machine the CPU time is what the work cost; both sides run in-process, vLLM's engine included)."""
    generate(plan[0]["requests"])
    seconds = []
    for row in plan:
        began, cpu = time.perf_counter(), time.process_time()
        generate(row["requests"])
        seconds.append((time.perf_counter() - began, time.process_time() - cpu))
    return seconds


def profile_row(generate, requests: list[dict], path: str) -> None:
    """The operators' self CPU time for ``requests`` with budgets capped at 16 tokens (prefill and the first decode
    steps: the profiler's event list for a full 128-token run of 32 requests outgrows the memory of a small machine)."""
    capped = [{**request, "budget": min(request["budget"], 16)} for request in requests]
    generate(capped)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        generate(capped)
        wall = time.perf_counter() - began
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    Path(path).write_text(f"{len(capped)} requests, {sum(r['budget'] for r in capped)} new tokens, "
                          f"{wall:.2f} s under the profiler\n{table}")


def side_main(args: argparse.Namespace) -> None:
    """One side in this process: time the plan's rows and write the seconds, or profile its last row."""
    plan = json.loads(Path(args.plan).read_text())
    torch.set_num_threads(args.threads)
    generate = (transformers_side if args.side == "transformers" else vllm_side)(Path(plan["folder"]))
    if args.profile_to:
        profile_row(generate, plan["rows"][-1]["requests"], args.profile_to)
        return
    seconds = time_rows(generate, plan["rows"])
    Path(args.result).write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


def model_folder(shape: str, scratch: Path) -> tuple[Path, int]:
    """The folder vLLM and transformers load: the demo, or parcae-140m with random weights and its remote code."""
    if shape == "demo":
        return demo_model_path(), ParcaeForCausalLM.config_class.from_pretrained(demo_model_path()).num_loops
    folder = scratch / "parcae-140m-random"
    model = build_parcae("parcae-140m", torch.float32)
    model.save_pretrained(folder)
    return folder, model.config.num_loops


def run_side(side: str, plan_path: Path, scratch: Path, threads: int, profile: str | None) -> dict:
    result = scratch / f"{side}.json"
    command = [sys.executable, "-P", __file__, "--side", side, "--plan", str(plan_path), "--result", str(result),
               "--threads", str(threads), *(["--profile-to", profile] if profile else [])]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return {} if profile else json.loads(result.read_text())


def shape_plan(sizes: dict, shape: str, scratch: Path) -> tuple[Path, int, list[dict]]:
    """The model folder, its default loop count and the rows (requests x traffic) of one shape."""
    folder, num_loops = model_folder(shape, scratch)
    vocab_size = ParcaeForCausalLM.config_class.from_pretrained(folder).vocab_size
    plan = [{"requests": workload(sizes, vocab_size, n, traffic), "count": n, "traffic": traffic}
            for traffic in ("uniform", "varied") for n in sizes["requests"]]
    plan_path = scratch / f"{shape}-plan.json"
    plan_path.write_text(json.dumps({"folder": str(folder), "rows": plan}))
    return plan_path, num_loops, plan


def profile(args: argparse.Namespace) -> None:
    """Where the time goes at parcae-140m, 32 requests (varied budgets, capped): each side under torch.profiler."""
    with tempfile.TemporaryDirectory() as scratch_name:
        plan_path, _, _ = shape_plan(FULL, "140m", Path(scratch_name))
        for side in ("transformers", "vllm"):
            out = HERE / "results" / f"serving_profile_{side}.txt"
            run_side(side, plan_path, Path(scratch_name), args.threads, str(out))
            print(f"{side}: {out}")


def benchmark(args: argparse.Namespace) -> None:
    """Time every row of every shape; the report is written after each shape (a long run keeps what it measured)."""
    import transformers
    import vllm

    sizes = SMOKE if args.smoke else FULL
    report = {"smoke": args.smoke, "machine": machine_description(args.threads),
              "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__},
              "dtype": "float32", "enforce_eager": True, "load_average_1min": [os.getloadavg()[0]],
              "torch_threads_per_side": {}, "rows": []}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        for shape in sizes["shapes"]:
            plan_path, num_loops, plan = shape_plan(sizes, shape, scratch)
            measured = {side: run_side(side, plan_path, scratch, args.threads, None)
                        for side in ("transformers", "vllm")}
            report["torch_threads_per_side"][shape] = {side: result["threads"] for side, result in measured.items()}
            for row, (hf_s, hf_cpu), (vllm_s, vllm_cpu) in zip(plan, measured["transformers"]["seconds"],
                                                                measured["vllm"]["seconds"]):
                tokens = sum(request["budget"] for request in row["requests"])
                report["rows"].append({"shape": shape, "num_loops": num_loops, "requests": row["count"],
                                       "traffic": row["traffic"], "new_tokens": tokens,
                                       "transformers_tokens_per_s": round(tokens / hf_s, 1),
                                       "vllm_tokens_per_s": round(tokens / vllm_s, 1),
                                       "ratio": round(hf_s / vllm_s, 2), "ratio_cpu_time": round(hf_cpu / vllm_cpu, 2)})
            report["load_average_1min"].append(os.getloadavg()[0])
            write_atomically(Path(args.out), lambda path: path.write_text(json.dumps(report, indent=1) + "\n"))
    print_table(report)


def print_table(report: dict) -> None:
    print(f"{'shape':6} {'loops':>5} {'requests':>8} {'traffic':8} {'tokens':>6} {'transformers tok/s':>18} "
          f"{'vLLM tok/s':>10} {'ratio':>6} {'CPU-time ratio':>14}")
    for row in report["rows"]:
        print(f"{row['shape']:6} {row['num_loops']:5} {row['requests']:8} {row['traffic']:8} {row['new_tokens']:6} "
              f"{row['transformers_tokens_per_s']:18.1f} {row['vllm_tokens_per_s']:10.1f} {row['ratio']:6.2f} "
              f"{row['ratio_cpu_time']:14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the demo only (the serve lane's check)")
    parser.add_argument("--out", default=str(HERE / "results" / "serving.json"))
    # one: vLLM's own choice on a 2-core machine ("Reducing Torch threads from 2 to 1"), and on a shared machine two
    # OpenMP threads spin-wait for a busy core (measured: transformers' rate fell up to tenfold between rows)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="only profile both sides at 140m, 32 requests")
    parser.add_argument("--side", choices=("transformers", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side_main(args)
    elif args.profile:
        profile(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
