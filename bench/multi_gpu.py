"""One GPU against DDP and FSDP2 on 2 GPUs, and a `device_map="auto"` split for generation (needs 2 GPUs).

    python bench/multi_gpu.py [--models mamba-130m mamba2-130m] [--steps 20] [--batch-size 16] [--seq-len 1024]

For each model it runs `examples/finetune.py` three times at the same global batch, bf16: `python` on one GPU,
`torchrun --nproc_per_node 2` (DDP) and the same with `--fsdp` (FSDP2, one unit per block), and reports tokens/s,
peak memory per GPU and the first steps' losses of each against the single-GPU run. Then it loads a model with
`device_map="auto"` over both GPUs and checks that its greedy tokens equal the single-GPU model's. Results are
printed and written to $OUT/multi_gpu.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = ROOT / "examples" / "finetune.py"


def run_finetune(model: str, mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One training run; returns its per-step losses and summary (from finetune.py's --log-file)."""
    log = workdir / f"{model}-{mode}.jsonl"
    launcher = [sys.executable]
    if mode != "single":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = launcher + [
        str(FINETUNE), "--model", model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--bf16", "--log-file", str(log), "--output-dir", str(workdir / "out"),
        "--text-chars", str(args.text_chars),
    ]
    command += (["--activation-checkpointing"] if args.activation_checkpointing else []) + \
        (["--fsdp"] if mode == "fsdp" else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if mode == "single":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-4000:]}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {"losses": [r["loss"] for r in records if "loss" in r],
            "summary": next(r for r in records if r.get("summary"))}


def device_map_check(model_name: str, tokens: int = 32) -> dict:
    """Greedy generation of a random-weight preset split over the GPUs by device_map='auto' vs one GPU."""
    from transformers import AutoModelForCausalLM

    import ssm_hf

    torch.manual_seed(0)
    config = ssm_hf.preset_config(model_name, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        single = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to("cuda:0").eval()
        # cap each GPU below the model's size so the layers really spread over both
        size = sum(p.numel() * p.element_size() for p in single.parameters())
        cap = f"{int(size * 0.6 / 2**20)}MiB"
        split = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="auto",
                                                     max_memory={0: cap, 1: "60GiB"}).eval()
    prompt = torch.randint(1, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=tokens, do_sample=False, use_cache=True)
    expected = single.generate(prompt.to("cuda:0"), **settings).cpu()
    got = split.generate(prompt.to("cuda:0"), **settings).cpu()
    devices = sorted({str(d) for d in split.hf_device_map.values()})
    return {"model": model_name, "devices": devices, "greedy_tokens_equal": bool(torch.equal(got, expected))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (rows per step)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--text-chars", type=int, default=2_000_000)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compare-steps", type=int, default=5, help="first steps whose losses are compared")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        print(f"bench/multi_gpu.py needs 2 GPUs; this machine has {torch.cuda.device_count()}: skipped.")
        return

    results = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "args": vars(args),
               "training": {}, "device_map": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            runs = {mode: run_finetune(model, mode, args, Path(tmp)) for mode in ("single", "ddp", "fsdp")}
            results["training"][model] = runs
            base = runs["single"].get("losses")
            print(f"\n{model}, global batch {args.batch_size} x {args.seq_len} tokens, bf16, {args.steps} steps")
            print(f"{'mode':8} {'tokens/s':>12} {'peak GiB per GPU':>22} {'max |loss - single| (first steps)':>36}")
            for mode, run in runs.items():
                if "error" in run:
                    print(f"{mode:8} FAILED:\n{run['error']}")
                    continue
                summary = run["summary"]
                n = args.compare_steps
                diff = max(abs(a - b) for a, b in zip(run["losses"][:n], base[:n])) if base else float("nan")
                run["max_loss_difference_first_steps"] = diff
                peaks = ", ".join(f"{p:.2f}" for p in summary["peak_memory_gib_per_process"] if p is not None)
                print(f"{mode:8} {summary['tokens_per_s'] or float('nan'):12,.0f} {peaks:>22} {diff:36.4f}"
                      + (f"   ({summary['fsdp_units']} FSDP units)" if mode == "fsdp" else ""))
    for model in args.models:
        try:
            check = device_map_check(model)
        except Exception as error:  # report and go on: the table above is still worth having
            check = {"model": model, "error": repr(error)}
        results["device_map"].append(check)
        print(f"device_map='auto' {model}: {check}")

    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "multi_gpu.json"
        path.write_text(json.dumps(results, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
