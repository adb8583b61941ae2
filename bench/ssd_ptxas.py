"""Compile the SSD Triton kernels for an H100 (sm_90a) without a GPU and print ptxas's registers and spills.

    env -u TRITON_INTERPRET PYTHONPATH=. python bench/ssd_ptxas.py [--shapes 64x128,128x256] [--only grads]

Every variant the launcher uses at each (head_dim x d_state): bf16 and float32 inputs, with and without seq_idx,
with and without an initial state (the walker: also forwards and backwards), the gradient kernel at 4 and 8 warps
and with 16-bit or float32 dB/dC outputs. The interpreter accepts code that the compiler rejects, and register
spills only show here; ptxas is the one Triton runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from ssm_hf.kernels import ssd_triton as S

TARGET = GPUTarget("cuda", 90, 32)
LENGTH, HEADS, GROUPS = 4096, 24, 1


def compile_report(kernel, types: dict, ints: dict, constexprs: dict, num_warps: int) -> str:
    """Registers, spill bytes and shared memory of `kernel` compiled with these argument types ('*bf16', 'i32')
    and constexprs; ints whose value is a multiple of 16 (and all pointers) are marked so, as a launch would."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        signature[name] = "constexpr" if name in constexprs else types[name]
        if name not in constexprs and (types[name].startswith("*") or ints.get(name, 1) % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=TARGET, options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", "-O3", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out).group(1)
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups()
    return f"regs {regs:>3}  spill st/ld {stores:>5}/{loads:<5}  smem {compiled.metadata.shared:>6}"


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x128,128x256", help="head_dim x d_state, comma-separated")
    parser.add_argument("--only", default="", help="compile only the kernels whose name contains this")
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        P, N = map(int, shape.split("x"))
        Q, n_chunks = S._chunk(P), triton.cdiv(LENGTH, S._chunk(P))
        ints = dict(L=LENGTH, H=HEADS, P=P, G=GROUPS, N=N, n_chunks=n_chunks)
        base = {name: "i32" for name in ints}
        _, walk_p, walk_n = S._state_walk_grid(8, HEADS, P, N)
        for dtype in ("bf16", "fp32"):
            x, states = "*" + dtype, ("*bf16" if dtype == "bf16" and S.STATES_16BIT else "*fp32")
            for has_seq in (False, True):
                seq = "*i32" if has_seq else "*fp32"
                common = dict(HAS_SEQ=has_seq, IEEE=dtype == "fp32", BLOCK_Q=Q)
                jobs = []
                for has_init in (False, True):
                    for reverse in (False, True):
                        types = dict(base, v_ptr=x, dt_ptr="*fp32", A_ptr="*fp32", w_ptr=x, seq_ptr=seq,
                                     init_ptr="*fp32", walk_ptr=states, last_ptr="*fp32")
                        jobs.append((f"init={int(has_init)} reverse={int(reverse)}", S._chunk_walk_kernel, types,
                                     ints, dict(common, HAS_INIT=has_init, REVERSE=reverse, BLOCK_P=walk_p,
                                                BLOCK_N=walk_n), S.WARPS["state_grads" if reverse else "states"]))
                types = dict(base, x_ptr=x, dt_ptr="*fp32", A_ptr="*fp32", B_ptr=x, C_ptr=x, D_ptr="*fp32",
                             seq_ptr=seq, states_ptr=states, y_ptr=x)
                jobs.append(("", S._chunk_output_kernel, types, ints, dict(
                    common, HAS_D=True, BLOCK_P=S._block(P, 64), BLOCK_N=S._block(N, S.N_BLOCK)), S.WARPS["output"]))
                for warps in (4, 8):
                    for out in sorted({x, "*fp32"}):   # one split writes dB/dC in the inputs' dtype, several float32
                        types = dict(base, x_ptr=x, dt_ptr="*fp32", A_ptr="*fp32", B_ptr=x, C_ptr=x, D_ptr="*fp32",
                                     seq_ptr=seq, states_ptr=states, dstates_ptr=states, dy_ptr=x, dx_ptr=x,
                                     ddt_ptr="*fp32", dB_ptr=out, dC_ptr=out, dB_acc_ptr="*fp32",
                                     dC_acc_ptr="*fp32", dA_ptr="*fp32", dD_ptr="*fp32", heads_per_program="i32",
                                     n_splits="i32")
                        jobs.append((f"dB/dC {out[1:]}", S._chunk_grads_kernel, types,
                                     dict(ints, heads_per_program=HEADS, n_splits=1), dict(
                                         common, HAS_D=True, BLOCK_P=S._block(P, S.MAX_HEAD_DIM),
                                         BLOCK_N=S._block(N, S.N_BLOCK)), warps))
                for label, kernel, types, values, constexprs, warps in jobs:
                    if args.only not in kernel.__name__:
                        continue
                    try:
                        line = compile_report(kernel, types, values, constexprs, warps)
                    except Exception as err:   # list every variant, the failures too
                        line = "FAILED " + repr(err)[:300]
                    print(f"{kernel.__name__:22s} {P}x{N} {dtype} seq={int(has_seq)} {label:22s} w{warps} {line}",
                          flush=True)


if __name__ == "__main__":
    main()
