"""GPU: the same `bench/gpu_kernels.py` sections for two checkouts of ssm_hf, alternated in one call, so that a
kernel change is timed beside what it replaces on the same machine (the peer measured in the same run).

    mkdir -p .base && git archive <commit> ssm_hf | tar -x -C .base     # the checkout to compare against
    python bench/gpu_ab.py --base .base --sections time,bwd_sweep --rounds 2

Each round runs the sections in a fresh process for the base (its ssm_hf first on the path) and then for this
working tree, and prints every result line the sections print, labelled `base` or `current` with the round. With
$OUT set, the labelled lines also go to $OUT/ab.json. The base is imported as `ssm_hf` from the directory given, so
it must hold an `ssm_hf` package (a copy, not an installed one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_sections(ssm_hf_parent: Path, sections: str, timeout: int) -> list[str]:
    """The output lines of `gpu_kernels.py --sections` with `ssm_hf` imported from ssm_hf_parent."""
    path = [str(ssm_hf_parent), str(ROOT / "bench")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1")
    env.pop("OUT", None)  # gpu_kernels.py would write its own results.json there
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_kernels.py"), "--sections", sections],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.splitlines()
    if done.returncode:
        lines.append(f"exit status {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="directory holding the base checkout's ssm_hf")
    parser.add_argument("--sections", default="time", help="gpu_kernels.py sections, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=280, help="seconds per process")
    args = parser.parse_args()
    base = args.base.resolve()
    if not (base / "ssm_hf" / "__init__.py").is_file():
        sys.exit(f"{base} holds no ssm_hf package")
    prefixes = tuple(args.sections.split(","))
    results = []
    for round_ in range(1, args.rounds + 1):
        for label, parent in (("base", base), ("current", ROOT)):
            for line in run_sections(parent, args.sections, args.timeout):
                if line.startswith(prefixes + ("[", "exit status")):
                    results.append(dict(round=round_, checkout=label, line=line))
                    print(f"[{label} {round_}] {line}", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "ab.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
