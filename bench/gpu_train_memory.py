"""GPU: correctness of the PyTorch paths on CUDA, and training-step memory and speed at 4 x 2048 tokens.

    PYTHONPATH=. python bench/gpu_train_memory.py [--steps 3] [--skip-peers]

1. On CUDA in float32, our Mamba, Mamba-2 and hybrid logits against transformers' Mamba, Mamba2 and Jamba with the
   same weights (max abs difference printed).
2. One training step (forward + backward, bf16 autocast over float32 weights, or float32 with --fp32; optimizer
   not included) at batch 4 x 2048 for the 130M presets: ours, and transformers' torch path of the same
   architecture in the same run. Peak memory is torch.cuda.max_memory_allocated over the steps; time is the median
   of `--steps` steps after one warm-up (one step for the peers).
Prints a Markdown table; writes results.json under $OUT if set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers

import ssm_hf
from ssm_hf.conversion import jamba_to_hybrid

DEVICE = "cuda"


def parity() -> list[tuple[str, float]]:
    rows = []
    torch.manual_seed(0)
    for preset, their_config, their_model in (("mamba-tiny", transformers.MambaConfig, transformers.MambaForCausalLM),
                                              ("mamba2-tiny", transformers.Mamba2Config,
                                               transformers.Mamba2ForCausalLM)):
        config = ssm_hf.preset_config(preset)
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "scan_chunk_size")}
        theirs = their_model(their_config(**fields)).to(DEVICE).eval()
        ours = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE).eval()
        ours.load_state_dict(theirs.state_dict())
        ids = torch.randint(0, config.vocab_size, (2, 300), device=DEVICE)
        with torch.no_grad():
            diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
        rows.append((f"{preset} vs transformers, 2x300", diff))
    jamba = transformers.JambaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4,
                                     attn_layer_offset=2, num_experts=4, mamba_d_state=8, mamba_dt_rank=4)
    theirs = transformers.JambaForCausalLM(jamba).to(DEVICE).eval()
    config, state = jamba_to_hybrid(jamba, theirs.state_dict())
    ours = ssm_hf.HybridForCausalLM(config).to(DEVICE).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, 128, (2, 300), device=DEVICE)
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    rows.append(("hybrid vs transformers Jamba, 2x300", diff))
    return rows


def train_step_stats(model: torch.nn.Module, batch: int, seqlen: int, steps: int, autocast: bool) -> dict:
    model.to(DEVICE).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=DEVICE)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times) if times else first
    return dict(peak_gb=torch.cuda.max_memory_allocated() / 1e9, weights_gb=base / 1e9, step_s=step_s,
                tokens_per_s=batch * seqlen / step_s, first_step_s=first)


def run_training(name: str, build, batch: int, seqlen: int, steps: int, autocast: bool) -> dict:
    model = None
    try:
        model = build()
        stats = train_step_stats(model, batch, seqlen, steps, autocast)
    except torch.cuda.OutOfMemoryError as err:
        stats = dict(error=f"out of memory ({str(err).splitlines()[0][:120]})",
                     peak_gb=torch.cuda.max_memory_allocated() / 1e9)
    finally:
        model = None
        torch.cuda.empty_cache()
    print(name, stats, flush=True)
    return dict(name=name, **stats)


def twin(preset: str):
    config = ssm_hf.preset_config(preset)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "scan_chunk_size")}
    if config.model_type == "ssm_mamba":
        return transformers.MambaForCausalLM(transformers.MambaConfig(**fields))
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**fields))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="float32 throughout instead of bf16 autocast")
    parser.add_argument("--models", default="mamba2,mamba", help="comma-separated: mamba2, mamba")
    args = parser.parse_args()
    families = args.models.split(",")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}",
          flush=True)
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   transformers=transformers.__version__, parity=parity(), training=[])
    for name, diff in results["parity"]:
        print(f"parity {name}: max abs diff {diff:.2e}", flush=True)
    runs = []
    for family in families:
        preset = f"{family}-130m"
        runs.append((f"ours {preset}", lambda p=preset: transformers.AutoModelForCausalLM.from_config(
            ssm_hf.preset_config(p)), args.steps))
        if not args.skip_peers:
            runs.append((f"transformers {family} 130m torch path", lambda p=preset: twin(p), min(args.steps, 1)))
    for name, build, steps in runs:
        results["training"].append(run_training(name, build, args.batch, args.seqlen, steps, not args.fp32))
    precision = "float32" if args.fp32 else "bf16 autocast"
    print(f"\n| model, training step {args.batch}x{args.seqlen}, {precision} | peak GB | step s | tokens/s |")
    print("| --- | --- | --- | --- |")
    for r in results["training"]:
        if "error" in r:
            print(f"| {r['name']} | {r['error']} (peak {r['peak_gb']:.1f} GB before failing) | | |")
        else:
            print(f"| {r['name']} | {r['peak_gb']:.2f} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "results.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
