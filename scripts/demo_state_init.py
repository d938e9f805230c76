"""Effect of the inference initial-state policy on the demo model's held-out loss.

This project starts the recurrent state at zero at inference (deterministic); the official code draws a fresh
truncated-normal ``like-init`` state on every forward. This script measures the held-out loss of the bundled demo
model for both, at several loop counts (the random policy over three seeds), and writes
``scripts/results/demo_state_init.json``.

    python scripts/demo_state_init.py
"""

import json
import platform
import statistics
from pathlib import Path

import torch
from transformers import AutoTokenizer

from modeling_parcae import ParcaeForCausalLM
from modeling_parcae.eval.bpb import bits_per_byte, read_documents
from modeling_parcae.bundled import demo_model_path


LOOPS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
OUTPUT = Path(__file__).parent / "results" / "demo_state_init.json"


def held_out_loss(model, tokenizer, documents, loops: int) -> float:
    return bits_per_byte(model, tokenizer, documents, num_loops=loops, progress=False)["loss"]


def main() -> int:
    path = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    documents = read_documents(path / "heldout.txt")
    zero = ParcaeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    official = ParcaeForCausalLM.from_pretrained(path, dtype=torch.float32, inference_state_init="config").eval()
    rows = []
    for loops in LOOPS:
        random_losses = []
        for seed in SEEDS:
            torch.manual_seed(seed)  # the official policy draws from the global generator on every forward
            random_losses.append(held_out_loss(official, tokenizer, documents, loops))
        row = dict(num_loops=loops, zero_state_loss=held_out_loss(zero, tokenizer, documents, loops),
                   random_state_loss_mean=statistics.mean(random_losses),
                   random_state_loss_std=statistics.pstdev(random_losses))
        row["difference_random_minus_zero"] = row["random_state_loss_mean"] - row["zero_state_loss"]
        rows.append(row)
        print(f"num_loops={loops:>2}  zero {row['zero_state_loss']:.4f}   like-init {row['random_state_loss_mean']:.4f}"
              f" ± {row['random_state_loss_std']:.4f}   diff {row['difference_random_minus_zero']:+.4f}", flush=True)
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(json.dumps(dict(machine=platform.machine(), torch=torch.__version__, model=str(path),
                                      held_out_documents=len(documents), seeds=list(SEEDS), rows=rows),
                                 indent=1) + "\n")
    print(f"-> {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
