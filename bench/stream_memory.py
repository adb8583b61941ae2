"""CPU: a 1,000,000-token stream through small SSMs in chunks, in flat memory.

    PYTHONPATH=. python bench/stream_memory.py [--tokens 1000000] [--chunk 4096] [--threads N] [--out results.json]
                                              [--models mamba-tiny,mamba2-tiny,s4d-tiny]

Each model (random init, float32, batch 1) runs in its own process: random token chunks are made on the fly and fed
through `ssm_hf.stream` (logits of the last position kept), one state carried throughout. Reported per model: the
process's resident memory (RSS) before streaming (torch, transformers and the model loaded), after the first
chunk, at 25/50/75/100 % of the stream, and its peak (ru_maxrss); the state's bytes (constant), tokens/s, and
whether every output and the final state are finite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import ssm_hf


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(preset: str, tokens: int, chunk: int) -> dict:
    """Stream `tokens` random ids through the preset's causal LM; returns the measurements."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ssm_hf.preset_config(preset)).eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    sizes = [chunk] * (tokens // chunk) + ([tokens % chunk] if tokens % chunk else [])
    chunks = (torch.randint(1, vocab, (1, n), generator=generator) for n in sizes)
    cache = ssm_hf.StateCache(config=model.config)
    marks = {round(len(sizes) * q) - 1: q for q in (0.25, 0.5, 0.75, 1.0)}
    row = {"model": preset, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "tokens": tokens,
           "chunk": chunk, "threads": torch.get_num_threads(), "all_finite": True, "state_bytes": set(),
           "rss_before_MB": current_rss_mb()}
    start = time.perf_counter()
    for i, out in enumerate(ssm_hf.stream(model, chunks, cache, logits_to_keep=1)):
        row["all_finite"] &= bool(torch.isfinite(out.logits).all())
        row["state_bytes"].add(cache.nbytes)
        if i == 0:
            row["rss_first_chunk_MB"] = current_rss_mb()
        if i in marks:
            row[f"rss_{int(marks[i] * 100)}pct_MB"] = current_rss_mb()
    seconds = time.perf_counter() - start
    snap = ssm_hf.snapshot(cache)
    row.update(seconds=seconds, tokens_per_s=tokens / seconds, peak_rss_MB=peak_rss_mb(),
               seen_tokens=cache.get_seq_length(), state_bytes=sorted(row["state_bytes"]),
               final_state_finite=all(bool(torch.isfinite(t).all()) for t in snap.tensors.values()))
    return row


def main() -> None:
    default_models = ["mamba-tiny", "mamba2-tiny", "s4d-tiny"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--models", default=",".join(default_models), help="comma-separated zoo presets")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:
        print(json.dumps(run_one(args.one, args.tokens, args.chunk)))
        return

    rows = []
    for preset in args.models.split(","):
        # a process per model, so that its peak RSS is its own
        command = [sys.executable, __file__, "--one", preset, "--tokens", str(args.tokens), "--chunk",
                   str(args.chunk)] + (["--threads", str(args.threads)] if args.threads else [])
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{preset} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"{preset}: done in {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)

    print("| model | params | tokens | chunk | tokens/s | state | RSS before | after 1st chunk | "
          "at 25 / 50 / 75 / 100 % | peak RSS | finite |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        state = " / ".join(f"{b / 1024:.1f} KiB" for b in r["state_bytes"])
        marks = " / ".join(f"{r[f'rss_{q}pct_MB']:.0f}" for q in (25, 50, 75, 100))
        print(f"| {r['model']} | {r['params_M']:.2f}M | {r['seen_tokens']:,} | {r['chunk']} | "
              f"{r['tokens_per_s']:,.0f} | {state} | {r['rss_before_MB']:.0f} MB | {r['rss_first_chunk_MB']:.0f} MB | "
              f"{marks} MB | "
              f"{r['peak_rss_MB']:.0f} MB | {r['all_finite'] and r['final_state_finite']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
