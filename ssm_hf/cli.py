"""Command line: `ssm-hf zoo` lists the presets (and shows one with `ssm-hf zoo NAME`)."""

from __future__ import annotations

import argparse
import json
import sys

from .configs import list_presets, preset_config


def _zoo(args: argparse.Namespace) -> int:
    if args.name is None:
        for name in list_presets():
            print(name)
        return 0
    try:
        config = preset_config(args.name)
    except KeyError as err:
        print(f"ssm-hf zoo: {err.args[0]}", file=sys.stderr)
        return 2
    print(json.dumps(config.to_diff_dict(), indent=2, sort_keys=True, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssm-hf", description="ssm-hf: state space models for transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    zoo = commands.add_parser("zoo", help="list the zoo's presets, or print one preset's config")
    zoo.add_argument("name", nargs="?", help="a preset name, e.g. mamba-tiny")
    zoo.set_defaults(func=_zoo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
