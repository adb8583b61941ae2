"""Command line: `ssm-hf zoo` lists the presets with their parameter counts (`ssm-hf zoo NAME` shows one);
`ssm-hf convert --from/--to FORMAT SRC OUT` converts checkpoints; `ssm-hf push FOLDER --repo-id NAME` uploads a
saved model to the Hugging Face Hub; `ssm-hf bench` measures speed and memory against context length (see
`ssm_hf.bench`)."""

from __future__ import annotations

import argparse
import json
import sys

from . import bench as bench_module
from . import hub, zoo
from .configs import preset_config


def _zoo(args: argparse.Namespace) -> int:
    if args.name is None:
        rows = zoo.zoo_table()
        width = max(len(name) for name, _, _ in rows)
        print(f"{'preset':<{width}}  {'model_type':<12}  parameters")
        for name, model_type, count in rows:
            print(f"{name:<{width}}  {model_type:<12}  {zoo.format_count(count)}")
        return 0
    try:
        config = preset_config(args.name)
    except KeyError as err:
        print(f"ssm-hf zoo: {err.args[0]}", file=sys.stderr)
        return 2
    print(json.dumps(config.to_diff_dict(), indent=2, sort_keys=True, default=str))
    return 0


def _convert(args: argparse.Namespace) -> int:
    """`ssm-hf convert --from FORMAT SRC OUT` / `--to FORMAT SRC OUT`: exit status 1 and one line on stderr naming
    the problem when the input is bad or the target cannot express the model."""
    from .conversion import ConversionError, convert_checkpoint

    try:
        out = convert_checkpoint(args.src, args.out, from_format=args.from_format, to_format=args.to_format,
                                 overwrite=args.overwrite, progress=True)
    except (ConversionError, NotImplementedError, OSError) as err:
        print(f"ssm-hf convert: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _add_convert(commands) -> None:
    from .conversion import FROM_FORMATS, TO_FORMATS

    convert = commands.add_parser(
        "convert", help="convert a checkpoint folder into ssm-hf (--from) or out of it (--to)",
        description="Convert a checkpoint folder (config.json + safetensors or pytorch_model.bin, sharded or not). "
                    "--from FORMAT SRC OUT writes an ssm-hf save_pretrained folder; --to FORMAT SRC OUT reads an "
                    "ssm-hf folder and writes FORMAT. --from s4 reads state-spaces S4 / S4D checkpoints (config.json "
                    "with state-spaces' options, weights as safetensors, .bin or one .ckpt/.pth/.pt file): see "
                    "README.md. OUT is written only when the conversion succeeds.")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=FROM_FORMATS, help="format of SRC")
    direction.add_argument("--to", dest="to_format", choices=TO_FORMATS, help="format to write to OUT")
    convert.add_argument("src", metavar="SRC", help="checkpoint folder to read")
    convert.add_argument("out", metavar="OUT", help="folder to create (must be absent or empty)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    convert.set_defaults(func=_convert)


def _add_push_command(commands) -> None:
    push = commands.add_parser(
        "push", help="upload a saved model folder to the Hugging Face Hub",
        description="Upload FOLDER (written by save_pretrained) to the Hub: safetensors weights, config, generation "
                    "config, tokenizer files if present and a model card, in one commit. The token is the one "
                    "huggingface_hub finds (HF_TOKEN or `hf auth login`); HF_ENDPOINT selects another Hub.")
    push.add_argument("folder", help="a folder written by save_pretrained")
    push.add_argument("--repo-id", required=True,
                      help="the Hub repository, e.g. my-org/mamba-130m (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="commit to this branch (created if missing) instead of the default branch")
    push.add_argument("--remote-code", action="store_true",
                      help="also upload the modeling code, so transformers alone loads the model with "
                           "trust_remote_code=True")
    push.add_argument("--license", help="license identifier for the model card, e.g. apache-2.0")
    push.add_argument("--base-model", help="Hub id of the model this one was converted or fine-tuned from")
    push.add_argument("--max-shard-size", default=hub.DEFAULT_MAX_SHARD_SIZE,
                      help=f"split safetensors files above this size (default {hub.DEFAULT_MAX_SHARD_SIZE})")
    push.add_argument("--commit-message", help="the commit's message")
    push.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        commit = hub.push_to_hub(
            args.folder, args.repo_id, private=True if args.private else None, revision=args.revision,
            remote_code=args.remote_code, license=args.license, base_model=args.base_model,
            max_shard_size=_shard_size(args.max_shard_size), commit_message=args.commit_message)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"ssm-hf push: {err}", file=sys.stderr)
        return 2
    except HfHubHTTPError as err:
        print(f"ssm-hf push: the Hub refused: {err}", file=sys.stderr)
        return 1
    print(f"Pushed {args.folder} to {args.repo_id}{f' (branch {args.revision})' if args.revision else ''}: "
          f"{commit.commit_url}")
    return 0


def _shard_size(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssm-hf", description="ssm-hf: state space models for transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    zoo = commands.add_parser("zoo", help="list the zoo's presets, or print one preset's config")
    zoo.add_argument("name", nargs="?", help="a preset name, e.g. mamba-tiny")
    zoo.set_defaults(func=_zoo)
    _add_convert(commands)
    _add_push_command(commands)
    bench = commands.add_parser("bench", help="measure speed and memory against context length; CSV and plots")
    bench_module.add_arguments(bench)
    bench.set_defaults(func=bench_module.run_from_args)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
