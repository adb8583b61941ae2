"""Offline (no GPU): compile one Triton kernel of ssm_hf for an NVIDIA target and print its loops' instruction mix.

    python bench/sass_mix.py selective_scan_triton:_fwd_kernel HAS_D=1 HAS_Z=1 HAS_BIAS=1 SOFTPLUS=1 HAS_H0=0 \
        HAS_SEQ=0 STORE_TILES=0 TILE_T=16 UNROLL=4 PREFETCH=1 BLOCK_D=32 BLOCK_N=16 LOCAL=0 --num-warps 1

Every constexpr of the kernel is given as NAME=value (integers; 0/1 for flags). Pointer arguments are 16-bit
(`--ptr16`, bf16) or float32, `seq_ptr` int32; integer arguments are 32-bit, those in `--divisible` marked
divisible by 16 as Triton specialises them at run time. Prints the instruction count of the whole kernel and of each
loop (a backward branch in the SASS, largest first) with its most frequent opcodes, the registers and stack per
thread (spills), and the layout conversions left in the TTGIR; `--keep DIR` writes the TTGIR, PTX and SASS there.
This is how the scan kernels' layouts and loads were chosen: the interpreter says nothing about the code a GPU
runs, and instruction counts alone do not say how fast it runs (registers and load latency matter: see
BENCHMARKS.md, fifth session), so measure candidates on a GPU before keeping one.
Run it without TRITON_INTERPRET, with a Triton that has its CUDA backend (its ptxas and nvdisasm are used).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_ADDRESS = re.compile(r"\s+/\*([0-9a-f]{4,})\*/")
_LABEL = re.compile(r"(\.L_x_\d+):")


def _signature(kernel, constexprs: dict, ptr16: set[str]) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if name in ptr16 else ("*i32" if name == "seq_ptr" else "*fp32")
        else:
            sig[name] = "i32"
    return sig


def _loops(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The SASS instruction lines and the (first, last) line of every loop (a branch back to an earlier label)."""
    lines, label_at, pending = [], {}, []
    for text in sass.splitlines():
        label = _LABEL.match(text.strip())
        if label:
            pending.append(label.group(1))
        elif _ADDRESS.match(text):
            for name in pending:
                label_at[name] = len(lines)
            pending = []
            lines.append(text)
    loops = []
    for i, text in enumerate(lines):
        target = re.search(r"BRA.*?(\.L_x_\d+)", text)
        if target and label_at.get(target.group(1), i + 1) <= i:
            loops.append((label_at[target.group(1)], i))
    return lines, loops


def _opcode_mix(lines: list[str]) -> collections.Counter:
    mix = collections.Counter()
    for text in lines:
        instruction = text.split("*/", 1)[1].strip()
        if instruction.startswith("@"):  # predicated
            instruction = instruction.split(None, 1)[1]
        mix[instruction.split()[0]] += 1
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", help="MODULE:KERNEL, a module of ssm_hf.kernels")
    parser.add_argument("constexprs", nargs="*", help="NAME=value for every constexpr argument")
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--maxnreg", type=int, help="a cap on registers per thread, as the kernels' configs set")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)")
    parser.add_argument("--ptr16", default="x_ptr,dt_ptr,z_ptr,dy_ptr,y_ptr,B_ptr,C_ptr",
                        help="comma-separated pointer arguments that are bf16 (the others float32)")
    parser.add_argument("--divisible", default="Dm,N", help="integer arguments specialised as multiples of 16")
    parser.add_argument("--min-loop", type=int, default=40, help="loops with fewer instructions are not listed")
    parser.add_argument("--keep", type=Path, help="directory for the TTGIR, PTX and SASS")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")

    sys.path.insert(0, str(ROOT))
    import triton
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, kernel_name = args.kernel.split(":")
    kernel = getattr(importlib.import_module(f"ssm_hf.kernels.{module_name}"), kernel_name)
    kernel = getattr(kernel, "fn", kernel)  # a FastLaunch wraps the JITFunction
    constexprs = {name: int(value) for name, value in (item.split("=", 1) for item in args.constexprs)}
    missing = [n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr and n not in constexprs]
    if missing:
        sys.exit(f"give a value for every constexpr: missing {', '.join(missing)}")
    sig = _signature(kernel, constexprs, set(args.ptr16.split(",")))
    divisible = set(args.divisible.split(","))
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(sig.items())
             if kind.startswith("*") or name in divisible}
    options = {"num_warps": args.num_warps}
    if args.maxnreg:
        options["maxnreg"] = args.maxnreg
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", args.arch, 32), options=options)
    tools = Path(nvidia.__file__).parent / "bin"
    keep = args.keep or Path(os.environ.get("TMPDIR", "/tmp")) / "sass_mix"
    keep.mkdir(parents=True, exist_ok=True)
    cubin = keep / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    (keep / "kernel.ttgir").write_text(compiled.asm["ttgir"])
    (keep / "kernel.ptx").write_text(compiled.asm["ptx"])
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", "-g", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    (keep / "kernel.sass").write_text(sass)

    lines, loops = _loops(sass)
    print(f"{kernel_name} for sm_{args.arch}, {args.num_warps} warps: {len(lines)} instructions")
    for first, last in sorted(loops, key=lambda span: span[0] - span[1]):
        if last - first + 1 >= args.min_loop:
            top = ", ".join(f"{op} {n}" for op, n in _opcode_mix(lines[first:last + 1]).most_common(24))
            print(f"  loop at instructions {first}-{last}: {last - first + 1} instructions: {top}")
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if resources:
        print(f"  registers {resources.group(1)}, stack {resources.group(2)} bytes (spills if > 0), "
              f"shared memory {resources.group(3)} bytes")
    print(f"  layout conversions in the TTGIR: {compiled.asm['ttgir'].count('convert_layout')}")


if __name__ == "__main__":
    main()
