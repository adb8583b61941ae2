"""Command line: `ssm-hf zoo` lists the presets with their parameter counts (`ssm-hf zoo NAME` shows one);
`ssm-hf bench` measures speed and memory against context length (see `ssm_hf.bench`)."""

from __future__ import annotations

import argparse
import json
import sys

from . import bench as bench_module
from . import zoo
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssm-hf", description="ssm-hf: state space models for transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    zoo = commands.add_parser("zoo", help="list the zoo's presets, or print one preset's config")
    zoo.add_argument("name", nargs="?", help="a preset name, e.g. mamba-tiny")
    zoo.set_defaults(func=_zoo)
    bench = commands.add_parser("bench", help="measure speed and memory against context length; CSV and plots")
    bench_module.add_arguments(bench)
    bench.set_defaults(func=bench_module.run_from_args)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
