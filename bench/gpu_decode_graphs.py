"""GPU: generate() decoding speed with CUDA graphs (the default on CUDA for pure SSM models) against eager decoding
steps (`disable_compile=True`), bf16, random weights.

    python bench/gpu_decode_graphs.py [--models mamba-130m mamba2-130m llama-130m] [--batches 1 64] [--prompt 2048]
        [--new 256] [--paths graphs graphs-fresh eager]

`llama-130m` is the peer: transformers' LlamaForCausalLM of the anchors' 130M shape (12 x 768, SDPA), decoded
with a static KV cache, which generate() compiles with CUDA graphs ("graphs" row: `cache_implementation="static"`),
and with its default dynamic cache, eager ("eager" row).

For each model and batch size: a random prompt of `--prompt` tokens, greedy, max_new_tokens = min_new_tokens =
`--new` (EOS cannot stop it). Timed with torch.cuda.Event around whole generate() calls of 1 new token (the
prefill and its token), 2 (plus the first decoding step) and `--new`:

    decode tok/s  = batch * (new - 1) / (t_new - t_1)    every decoding step, the first included
    steady tok/s  = batch * (new - 2) / (t_new - t_2)    the steps after the first
    first step ms = t_2 - t_1

each after warm-up calls, measured twice (both runs reported). Each call makes a new cache. Paths (`--paths`):

- graphs: the default on CUDA. The model keeps the graph captured by the warm-up calls, so the timed calls replay
  it from their first decoding step (a later generate() call, as a pipeline or a server makes them);
- graphs-fresh: the same with the kept graphs released before every timed call (not timed), so each call captures
  anew at its first decoding step: what every call paid before graphs were kept across calls (our models only);
- eager: `disable_compile=True`.

`captures` counts the graphs captured during the timed calls (0 for graphs, one per call with a decoding step for
graphs-fresh). It also checks that the graphed calls replayed a graph for every decoding step (the returned
cache's `decode_graphs`) and the eager ones none, and compares the greedy tokens of the paths with eager's.
Prints a table; writes $OUT/decode_graphs.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's ssm_hf, installed or not

import transformers  # noqa: E402
from llama_peer import llama_130m_config  # noqa: E402

import ssm_hf  # noqa: E402
from ssm_hf.models.cache_names import output_cache  # noqa: E402
from ssm_hf.models.graphs import clear_decode_graphs, decode_graph_store  # noqa: E402

DEV = "cuda"
PATHS = ("graphs", "graphs-fresh", "eager")


LLAMA = "llama-130m"


def build(name: str):
    """One of our presets, or the Llama peer (anchors' 130M shape), bf16 on the GPU, random weights."""
    if name == LLAMA:
        config = llama_130m_config()
        model = transformers.LlamaForCausalLM(config)
    else:
        config = ssm_hf.preset_config(name)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return config, model.to(DEV, torch.bfloat16).eval()


def timed_generate(model, ids: torch.Tensor, new: int, graphs: bool, fresh: bool = False) -> tuple[float, object]:
    """Seconds (CUDA events) for one greedy generate() of exactly `new` tokens, and its output; `fresh`: release
    the model's kept graphs first (not timed), so that the call captures anew."""
    if fresh:
        clear_decode_graphs(model)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, disable_compile=not graphs)
    if graphs and isinstance(model, transformers.LlamaForCausalLM):
        kwargs["cache_implementation"] = "static"   # the Llama peer's compiled (CUDA-graphed) decoding
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, out


def replays(out) -> int:
    """Decoding steps replayed from graphs in a generate() output (its cache's captured steps)."""
    return sum(entry.replays for entry in getattr(output_cache(out), "decode_graphs", {}).values())


def measure(model, ids: torch.Tensor, new: int, path: str, runs: int = 2) -> dict:
    batch = ids.shape[0]
    graphs, fresh = path != "eager", path == "graphs-fresh"
    for length in (1, 2, new):  # warm-up: Triton / torch.compile (one graph per static-cache length), allocator
        timed_generate(model, ids, length, graphs, fresh)
    row = {"decode_tok_s": [], "steady_tok_s": [], "first_step_ms": [], "prefill_s": []}
    store = decode_graph_store(model)
    captures = store.captures
    for _ in range(runs):
        t1, _ = timed_generate(model, ids, 1, graphs, fresh)
        t2, _ = timed_generate(model, ids, 2, graphs, fresh)
        tn, out = timed_generate(model, ids, new, graphs, fresh)
        row["decode_tok_s"].append(batch * (new - 1) / (tn - t1))
        row["steady_tok_s"].append(batch * (new - 2) / (tn - t2))
        row["first_step_ms"].append((t2 - t1) * 1e3)
        row["prefill_s"].append(t1)
    row["captures"] = None if isinstance(model, transformers.LlamaForCausalLM) else store.captures - captures
    row["replayed_steps"] = replays(out)
    row["expected_replays"] = (new - 1) if graphs and not isinstance(model, transformers.LlamaForCausalLM) else 0
    row["sequences"] = out.sequences
    return row


def compare(graphed: torch.Tensor, eager: torch.Tensor, prompt: int) -> dict:
    """Whether the greedy tokens agree, and where they first differ (generated position) if not."""
    same = (graphed[:, prompt:] == eager[:, prompt:])
    differing = (~same).any(0).nonzero()
    return {"tokens_equal": bool(same.all()), "matching_fraction": same.float().mean().item(),
            "first_difference": None if differing.numel() == 0 else int(differing[0])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m", LLAMA])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a CUDA GPU.")
    import triton

    results = {"device": torch.cuda.get_device_name(), "prompt": args.prompt, "new_tokens": args.new,
               "versions": dict(torch=torch.__version__, triton=triton.__version__,
                                transformers=transformers.__version__), "rows": []}
    print(results["device"], results["versions"], flush=True)
    for name in args.models:
        torch.manual_seed(0)
        config, model = build(name)
        for batch in args.batches:
            ids = torch.randint(1, config.vocab_size, (batch, args.prompt), device=DEV,
                                generator=torch.Generator(device=DEV).manual_seed(batch))
            rows = {}
            for path in args.paths:
                if path == "graphs-fresh" and name == LLAMA:
                    continue   # (its compiled static-cache steps are torch.compile's to keep)
                try:
                    rows[path] = measure(model, ids, args.new, path)
                except torch.cuda.OutOfMemoryError:
                    rows[path] = {"error": "out of memory"}
                clear_decode_graphs(model)
                torch.cuda.empty_cache()
            eager = rows.get("eager", {}).get("sequences")
            checks = {path: compare(row["sequences"], eager, args.prompt)
                      for path, row in rows.items() if path != "eager" and eager is not None and "sequences" in row}
            for path, row in rows.items():
                row.pop("sequences", None)
                check = checks.get(path, {})
                entry = {"model": name, "batch": batch, "path": path, **row, **check}
                if "error" not in row:   # (the Llama peer's compiled steps are not counted)
                    entry["graph_path_ran"] = (None if name == LLAMA
                                               else row["replayed_steps"] == row["expected_replays"])
                results["rows"].append(entry)
                print(json.dumps(entry), flush=True)
        model = None
        torch.cuda.empty_cache()

    print(f"\n{results['device']}: generate() decoding, bf16, random weights, prompt {args.prompt}, "
          f"{args.new} new tokens (two runs each)\n")
    print("| model | batch | path | decode tok/s | steady tok/s | first step ms | captures | graph path ran "
          "| tokens equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {r['path']} | {r['error']} | | | | | |")
            continue
        fmt = lambda values, spec: " / ".join(format(v, spec) for v in values)  # noqa: E731
        print(f"| {r['model']} | {r['batch']} | {r['path']} | {fmt(r['decode_tok_s'], ',.0f')} | "
              f"{fmt(r['steady_tok_s'], ',.0f')} | {fmt(r['first_step_ms'], '.1f')} | {r['captures']} | "
              f"{r['graph_path_ran']} | {r.get('tokens_equal')} |")
    speedups = {}
    for r in results["rows"]:
        if r["path"] != "eager" and "error" not in r:
            eager = next((e for e in results["rows"] if e["path"] == "eager" and e["model"] == r["model"]
                          and e["batch"] == r["batch"] and "error" not in e), None)
            if eager:
                speedups[f"{r['model']} b{r['batch']} {r['path']}"] = (max(r["decode_tok_s"])
                                                                      / max(eager["decode_tok_s"]))
    results["speedup_decode"] = speedups
    print("\nspeed-up of decode tok/s (best run of each):",
          ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))
    against_llama = {}
    for r in results["rows"]:
        peer = next((e for e in results["rows"] if e["model"] == LLAMA and e["path"] == r["path"]
                     and e["batch"] == r["batch"] and "error" not in e), None)
        if r["model"] != LLAMA and "error" not in r and peer:
            key = f"{r['model']} b{r['batch']} {r['path']}"
            against_llama[key] = max(r["decode_tok_s"]) / max(peer["decode_tok_s"])
    results["against_llama"] = against_llama
    print("decode tok/s against the Llama peer on the same path (graphs: its static cache, compiled):",
          ", ".join(f"{k} {v:.2f}x" for k, v in against_llama.items()))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_graphs.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
