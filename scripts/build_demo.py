"""Package a finished ``parcae train demo-shakespeare`` run as the bundled demo model (``modeling_parcae/demo``).

Writes fp16 safetensors (the package-data budget is 8 MB), the tokenizer, the held-out text (the paragraphs the
recipe held out for validation, for ``parcae eval --tasks bpb``), a summary of the training log and a model card.
The destination is replaced atomically.

    python scripts/build_demo.py runs/demo-shakespeare modeling_parcae/demo
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

import modeling_parcae
from modeling_parcae import ParcaeForCausalLM
from modeling_parcae.atomic import atomic_directory
from modeling_parcae.training.data import load_documents
from modeling_parcae.training.recipe import load_recipe


RECIPE = "demo-shakespeare"
PACKAGE_DIR = Path(modeling_parcae.__file__).resolve().parent


def training_summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recipe = load_recipe(RECIPE)
    validation = [{k: v for k, v in r.items() if k == "step" or k.startswith("val/")}
                  for r in records if any(k.startswith("val/") for k in r)]
    tokens_per_step = recipe.training.global_batch_size * recipe.data.block_size
    return dict(
        recipe=f"configuration/recipes/{RECIPE}.yaml",
        steps=records[-1]["step"], tokens=records[-1]["step"] * tokens_per_step,
        first_train_loss=records[0]["train/loss"], last_train_loss=records[-1]["train/loss"],
        mean_tokens_per_s=sum(r["train/tokens_per_s"] for r in records) / len(records),
        skipped_steps=records[-1]["train/skipped_steps"], validation=validation,
        held_out_paragraphs=recipe.data.validation_documents,
    )


def held_out_text() -> str:
    recipe = load_recipe(RECIPE)
    documents = load_documents(recipe.data.path, None, "train", False, recipe.data.sample_by)
    return "\n\n".join(documents.take(recipe.data.validation_documents)["text"]) + "\n"


def model_card(summary: dict, parameters: int) -> str:
    last_validation = summary["validation"][-1] if summary["validation"] else {}
    losses = ", ".join(f"{k.split('/')[-1]}: {v:.3f}" for k, v in last_validation.items() if "loss" in k)
    return f"""---
library_name: transformers
tags: [parcae, looped-language-model, demo]
---
# Parcae demo model (tinyshakespeare)

A {parameters / 1e6:.1f}M-parameter Parcae looped language model bundled with `parcae-transformers`: the released
design (diagonal injection, prelude 1 / core 2 / coda 1 blocks, `mean_recurrence` 8, truncated backprop through the
last 4 loops, Muon + AdamW) at toy width (d=192), trained on tinyshakespeare with a 2048-token byte-level BPE
tokenizer, {summary['steps']} steps / {summary['tokens'] / 1e6:.1f}M tokens on 2 CPU cores. Weights stored in fp16.

```python
import torch, modeling_parcae
from transformers import AutoModelForCausalLM, AutoTokenizer
path = modeling_parcae.demo_model_path()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(path)
ids = tokenizer("ROMEO:", return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, num_loops=8, max_new_tokens=60)[0]))
```

Without the package (the directory carries `auto_map` and the modeling code):
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`, `AutoModel.from_pretrained(path,
trust_remote_code=True)`, `AutoTokenizer.from_pretrained(path, trust_remote_code=True)` (the tokenizer is the standard
`TokenizersBackend`; transformers reads the remote-code config to choose it, hence the flag) or
`pipeline("text-generation", model=path, trust_remote_code=True)`.

Training: first/last train loss {summary['first_train_loss']:.3f} / {summary['last_train_loss']:.3f}; held-out
validation at the end ({losses}). `heldout.txt` holds the {summary['held_out_paragraphs']} held-out paragraphs
(never trained on) for `parcae eval --model <this dir> --tasks bpb --text <this dir>/heldout.txt`.
Reproduce: `parcae train demo-shakespeare`, then `python scripts/build_demo.py runs/demo-shakespeare DST`.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("destination", type=Path)
    args = parser.parse_args()

    model = ParcaeForCausalLM.from_pretrained(args.run_dir / "final", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.run_dir / "final")
    summary = training_summary(args.run_dir)
    parameters = sum(p.numel() for p in model.parameters())

    with atomic_directory(args.destination, overwrite=True) as staging:
        model.to(torch.float16).save_pretrained(staging)
        # save_pretrained wrote auto_map and copied the remote code (modeling only), so the demo also loads with
        # trust_remote_code=True without the package. Inside the package the copies become links to the package's
        # own files (../modeling_parcae.py, ...), which can never go stale.
        if args.destination.resolve().parent == PACKAGE_DIR:
            for remote_code in staging.glob("*.py"):
                remote_code.unlink()
                remote_code.symlink_to(Path("..") / remote_code.name)
        tokenizer.save_pretrained(staging)
        (staging / "heldout.txt").write_text(held_out_text())
        (staging / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (staging / "README.md").write_text(model_card(summary, parameters))
    size = sum(f.stat().st_size for f in args.destination.iterdir())
    print(f"demo model ({parameters:,} parameters, {size / 2**20:.2f} MiB) written to {args.destination}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
