"""``parcae train`` and ``parcae train-tokenizer``, registered into the ``parcae`` command by modeling_parcae.cli."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training subcommands; each sets ``func`` to a callable taking the parsed arguments."""
    train = subparsers.add_parser(
        "train", help="train a model from a recipe YAML with Accelerate (works under `accelerate launch`)",
        description="Train from a recipe. Example: parcae train tiny-cpu training.max_steps=20",
    )
    train.add_argument("recipe", help="recipe YAML path, or the name of a bundled recipe (e.g. tiny-cpu)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted recipe overrides parsed as YAML (e.g. output_dir=runs/x data.block_size=128)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint folder")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="compile each block once (regional torch.compile), shared by every loop and sampled "
                            "depth; sets training.compile (default: on where CUDA is present)")
    train.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                       help="bf16 autocast over fp32 weights (used where a bf16-capable GPU is present) or plain "
                            "fp32; sets training.mixed_precision (default: the recipe's, bf16 in the bundled ones)")
    train.set_defaults(func=_run_train)

    tokenizer = subparsers.add_parser(
        "train-tokenizer", help="train a byte-level BPE tokenizer in the official Parcae format",
        description="Example: parcae train-tokenizer --data ../shared/data/tinyshakespeare.txt --vocab-size 512 "
                    "--output my-tokenizer",
    )
    tokenizer.add_argument("--data", required=True,
                           help="local .txt/.jsonl/.parquet file or folder, or a Hub dataset id")
    tokenizer.add_argument("--name", default=None, help="Hub dataset configuration (e.g. sample-10BT)")
    tokenizer.add_argument("--split", default="train", help="split of a Hub dataset")
    tokenizer.add_argument("--streaming", action="store_true", help="stream a Hub dataset instead of downloading it")
    tokenizer.add_argument("--text-column", default="text", help="column holding the documents (jsonl/parquet/Hub)")
    tokenizer.add_argument("--sample-by", default="paragraph", choices=["line", "paragraph", "document"],
                           help="how plain-text files are cut into documents")
    tokenizer.add_argument("--max-documents", type=int, default=None,
                           help="train on at most this many documents (default: all)")
    tokenizer.add_argument("--vocab-size", type=int, default=32768,
                           help="tokens in the vocabulary, the 3 special tokens and 256 bytes included")
    tokenizer.add_argument("--output", required=True, help="folder for the transformers tokenizer files (written "
                                                         "complete or not at all)")
    tokenizer.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output folder")
    tokenizer.set_defaults(func=_run_train_tokenizer)


def _run_train(args: argparse.Namespace) -> int:
    from modeling_parcae.training.loop import train
    from modeling_parcae.training.recipe import load_recipe

    flags = []
    if args.compile is not None:
        flags.append(f"training.compile={str(args.compile).lower()}")
    if args.dtype is not None:
        flags.append(f"training.mixed_precision={'no' if args.dtype == 'fp32' else 'bf16'}")
    recipe = load_recipe(args.recipe, [*args.overrides, *flags])
    train(recipe, resume=args.resume_from or ("latest" if args.resume else None))
    return 0


def _run_train_tokenizer(args: argparse.Namespace) -> int:
    from modeling_parcae.training.data import check_text_column, load_documents
    from modeling_parcae.training.tokenizer import iter_texts, train_tokenizer

    documents = load_documents(args.data, args.name, args.split, args.streaming, args.sample_by)
    check_text_column(documents, args.text_column, args.data)
    tokenizer = train_tokenizer(iter_texts(documents, args.text_column, args.max_documents), args.vocab_size,
                                args.output, overwrite=args.overwrite)
    print(f"tokenizer with {len(tokenizer)} tokens saved to {args.output}")
    return 0
