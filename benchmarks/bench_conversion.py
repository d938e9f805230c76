"""Time and peak memory of `parcae convert` on a randomly initialised checkpoint of the 140M preset.

The official checkpoint is built by the reverse conversion (official key names, tied head, freqs_cis) from a random
ParcaeForCausalLM; the conversion then runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its
own (VmHWM). Writes benchmarks/results/conversion.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_conversion.py [--preset parcae-140m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).resolve().parent / "results" / "conversion.json"

# runs in the child: imports first (baseline RSS), then the conversion alone
# (VmHWM, not ru_maxrss: Linux carries ru_maxrss of the forking parent across exec)
CHILD = """
import json, sys, time
import torch
from modeling_parcae.conversion.convert import convert_official_to_transformers
import modeling_parcae.modeling_parcae

def high_water_mark():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

baseline = high_water_mark()
start = time.perf_counter()
convert_official_to_transformers(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3])
seconds = time.perf_counter() - start
peak = high_water_mark()
print(json.dumps({"seconds": seconds, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak}))
"""


def build_official_checkpoint(preset: str, directory: Path) -> int:
    """Random model -> official config.json + model.pt; returns the weights file size in bytes."""
    from modeling_parcae import ParcaeForCausalLM, load_preset
    from modeling_parcae.conversion.official_config import official_config_from_parcae
    from modeling_parcae.conversion.state_dict import expected_hf_shapes, hf_to_official

    config = load_preset(preset)
    torch.manual_seed(0)
    model = ParcaeForCausalLM(config)
    official = hf_to_official(model.state_dict(), config, expected_hf_shapes(config))
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(official_config_from_parcae(config, preset)))
    torch.save(official, directory / "model.pt")
    return (directory / "model.pt").stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="parcae-140m")
    parser.add_argument("--max-shard-size", default="2GB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        source, destination = Path(scratch) / "official", Path(scratch) / "converted"
        checkpoint_bytes = build_official_checkpoint(args.preset, source)
        started = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", CHILD, str(source), str(destination), args.max_shard_size],
                               capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        output_bytes = sum(path.stat().st_size for path in destination.glob("*.safetensors"))
    increment = measured["peak_rss_bytes"] - measured["baseline_rss_bytes"]
    result = {
        "preset": args.preset,
        "checkpoint_bytes": checkpoint_bytes,
        "safetensors_bytes": output_bytes,
        "convert_seconds": round(measured["seconds"], 3),
        "subprocess_wall_seconds": round(wall, 3),
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "baseline_rss_bytes_after_imports": measured["baseline_rss_bytes"],
        "peak_rss_increment_bytes": increment,
        "peak_over_checkpoint": round(measured["peak_rss_bytes"] / checkpoint_bytes, 3),
        "increment_over_checkpoint": round(increment / checkpoint_bytes, 3),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if measured["peak_rss_bytes"] > 2 * checkpoint_bytes:
        print(f"FAIL: peak RSS {measured['peak_rss_bytes'] / 2**20:.0f} MiB > 2x checkpoint "
              f"({2 * checkpoint_bytes / 2**20:.0f} MiB)", file=sys.stderr)
        return 1
    print(f"OK: peak RSS is {result['peak_over_checkpoint']}x the checkpoint size (limit 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
