"""Peak memory and time of an S4 / S4D prefill at length 16,384 on CPU (2-layer, 64-wide model).

    python bench/cpu_s4_memory.py [--length 16384] [--batch 1]

Each case runs in a fresh subprocess: build the model, warm up on 256 tokens, then one forward over the whole
prompt. Peak memory is the growth of the process's peak resident set size during that forward, so it counts every
allocation torch makes on the CPU: Linux's VmHWM after resetting it (`/proc/self/clear_refs`) before the forward,
else the growth of `resource.getrusage(...).ru_maxrss` (which cannot be reset, so a warm-up that peaked higher
hides the forward's peak). Time is the faster of that forward and one more.

Cases: S4 (DPLR, HiPPO-LegS) with C̃ attuned to the prompt length and attuned to 1,024 (extended on the fly by
doubling), and S4D (diagonal, S4D-Lin, ZOH); each without a cache (training-style forward, no gradients) and with
one (prefill: the final state is computed too). An L x L float32 matrix at this length would take
L^2 * 4 bytes (1 GiB at 16,384) per channel; the convolution view never builds one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CASES = {
    "s4 (DPLR, l_max = length)": dict(kernel="dplr", init="legs", discretization="bilinear", l_max=None),
    "s4 (DPLR, l_max = 1024, extended)": dict(kernel="dplr", init="legs", discretization="bilinear", l_max=1024),
    "s4d (diag, s4d_lin, zoh)": dict(kernel="diag", init="s4d_lin", discretization="zoh"),
}


def child(case: str, use_cache: bool, length: int, batch: int) -> None:
    import torch

    import ssm_hf

    fields = dict(CASES[case])
    if fields.get("l_max", 0) is None:
        fields["l_max"] = length
    torch.manual_seed(0)
    config = ssm_hf.S4Config(hidden_size=64, num_hidden_layers=2, state_size=64, vocab_size=512, **fields)
    model = ssm_hf.S4ForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, length))
    with torch.no_grad():
        model.backbone(ids[:, :256], use_cache=use_cache)          # warm-up: libraries, thread pools
        resettable = _reset_peak()
        before = _kib("VmRSS") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for repeat in range(2):
            start = time.perf_counter()
            out = model.backbone(ids, use_cache=use_cache)
            times.append(time.perf_counter() - start)
            if repeat == 0:
                peak = _kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        finite = bool(out.last_hidden_state.isfinite().all())
    print(json.dumps(dict(peak_mb=(peak - before) / 1024, seconds=min(times), finite=finite,
                          method="VmHWM" if resettable else "ru_maxrss")))


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux's clear_refs is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _kib("VmHWM") > 0
    except OSError:
        return False


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "cache", args.length, args.batch)
        return

    import torch
    import transformers

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"prefill of {args.batch} x {args.length} tokens, 2 layers, hidden 64, state 64, float32, no gradients; "
          f"an L x L float32 matrix would be {args.length ** 2 * 4 / 2 ** 20:,.0f} MiB\n")
    print("| model | cache | peak memory growth | time |")
    print("| --- | --- | --- | --- |")
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for case in CASES:
        for mode in ("none", "cache"):
            out = subprocess.run([sys.executable, __file__, "--length", str(args.length), "--batch", str(args.batch),
                                  "--child", case, mode], capture_output=True, text=True, env=env, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result["finite"], (case, mode)
            label = "without" if mode == "none" else "with (final state)"
            memory = f"{result['peak_mb']:,.0f} MiB ({result['method']})"
            print(f"| {case} | {label} | {memory} | {result['seconds']:.2f} s |")


if __name__ == "__main__":
    main()
