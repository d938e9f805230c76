"""``parcae convert`` and ``parcae push`` (registered by ``modeling_parcae.cli``)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from modeling_parcae.conversion.convert import DEFAULT_MAX_SHARD_SIZE, convert_official_to_transformers, convert_transformers_to_official
from modeling_parcae.conversion.hub import default_tokenizer_source, download_official
from modeling_parcae.conversion.official_format import is_official_config, read_config
from modeling_parcae.conversion.push import push_converted
from modeling_parcae.inputs import local_path_or_hub_id


def register(subparsers) -> None:
    if "convert" not in subparsers.choices:
        convert = subparsers.add_parser(
            "convert", help="convert an official parcae_lm checkpoint to transformers (or back with --to official)",
            description="SRC is a local directory or a Hub repo id. Nothing is written to DST unless the whole "
                        "conversion succeeds.")
        convert.add_argument("src", help="official checkpoint (directory or Hub repo id); with --to official, a "
                                         "transformers directory")
        convert.add_argument("dst", help="new directory to write (must not be SRC or lie inside it)")
        convert.add_argument("--to", choices=("transformers", "official"), default="transformers",
                             help="target format: transformers (safetensors + remote code + tokenizer) or official "
                                  "(config.json + model.pt for parcae_lm)")
        convert.add_argument("--tokenizer", help="tokenizer directory or Hub repo id (default: the one in SRC, else "
                                                 "SandyResearch/parcae-tokenizer for Hub sources)")
        convert.add_argument("--revision", help="Hub revision of SRC")
        convert.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                             help="largest safetensors file; bigger checkpoints are split, e.g. 500MB, 5GB")
        convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
        convert.set_defaults(func=run_convert)
    if "push" not in subparsers.choices:
        push = subparsers.add_parser("push", help="upload a converted directory (or convert an official SRC first)")
        push.add_argument("src", help="output of `parcae convert`, or an official checkpoint directory / repo id")
        push.add_argument("repo_id", help="Hub repository to create or update, e.g. my-org/parcae-140m")
        push.add_argument("--tokenizer", help="tokenizer directory or Hub repo id, for an official SRC converted first "
                                              "(default: as for parcae convert)")
        push.add_argument("--private", action="store_true", help="create the repository as private")
        push.add_argument("--token", help="Hub access token (default: the one saved by `hf auth login`)")
        push.set_defaults(func=run_push)


def run_convert(args: argparse.Namespace) -> int:
    local_path_or_hub_id(args.src, "SRC")
    if args.to == "official":
        convert_transformers_to_official(_local_transformers_dir(args.src, args.revision), args.dst,
                                         overwrite=args.overwrite)
    else:
        source_dir, tokenizer = _official_source(args.src, args.revision, args.tokenizer)
        convert_official_to_transformers(source_dir, args.dst, tokenizer_source=tokenizer, source_name=args.src,
                                         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        if not (Path(args.dst) / "tokenizer.json").is_file():
            print(f"parcae convert: no tokenizer found for {args.src}; pass --tokenizer to include one",
                  file=sys.stderr)
    print(f"wrote {args.dst}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    local_path_or_hub_id(args.src, "SRC")
    source = Path(args.src)
    if source.is_dir() and not is_official_config(read_config(source)):
        info = push_converted(source, args.repo_id, private=args.private, token=args.token)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            source_dir, tokenizer = _official_source(args.src, None, args.tokenizer)
            converted = convert_official_to_transformers(source_dir, Path(scratch) / "converted",
                                                         tokenizer_source=tokenizer, source_name=args.src)
            info = push_converted(converted, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.src} to {getattr(info, 'commit_url', args.repo_id)}")
    return 0


def _official_source(src: str, revision: str | None, tokenizer: str | None) -> tuple[Path, str | Path | None]:
    """Local official checkpoint (downloading Hub sources) and the tokenizer to use."""
    if Path(src).exists():
        return Path(src), tokenizer
    source_dir = download_official(src, revision=revision)
    return source_dir, tokenizer or default_tokenizer_source(src, source_dir, revision=revision)


def _local_transformers_dir(src: str, revision: str | None) -> Path:
    if Path(src).is_dir():
        return Path(src)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
