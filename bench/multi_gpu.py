"""One GPU against DDP and FSDP2 on 2 GPUs for every family, and `device_map="auto"` generation (needs 2 GPUs).

    PYTHONPATH=. python bench/multi_gpu.py              # 4 models x 3 modes x {bf16, fp32}, then device_map
    PYTHONPATH=. python bench/multi_gpu.py --models hybrid-moe-130m --dtype fp32 --modes single ddp

Each (dtype, model, mode) is one run of `examples/finetune.py` in its own subprocess, at the same global batch
(rows in the same order): `python` on one GPU ("single"), `torchrun --nproc_per_node 2` ("ddp") and the same with
`--fsdp` ("fsdp": FSDP2, one unit per block, from the model's `_no_split_modules`). A run that fails or passes
`--run-timeout` is recorded with the end of its output, and the next one starts. For each run: tokens/s (steps
after the first), peak memory per GPU, FSDP units, and the largest |loss - single's loss| over the first
`--compare-steps` steps. In fp32 that difference is float32 rounding if the run computes the same thing as one GPU
on the same global batch; in bf16 it is larger (bf16 rounding, which grows over the steps).

Then, per model, a `device_map="auto"` check in its own subprocess: random weights saved and loaded over the 2
GPUs (GPU 0 capped so that the blocks spread), greedy tokens compared with the model on one GPU.

Runs that would end past `--time-budget` (default 540 s, judged by the longest run so far) are skipped and listed,
so that the command returns in time with what it has; rerun those with `--models` / `--dtype` / `--modes`.
Results are printed as a table and written, after every run, to OUT/multi_gpu.json (OUT: `--out`, default $OUT or
./multi_gpu-out), the runs' outputs to OUT/logs/. `--cpu` runs the training part on CPU with gloo (a smoke test of
this script; FSDP needs GPUs there and is recorded as failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = ROOT / "examples" / "finetune.py"
MODELS = ["mamba-130m", "mamba2-130m", "hybrid-moe-130m", "s4d-130m"]
MODES = ["single", "ddp", "fsdp"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def error_line(output: str) -> str:
    """The line of a failed run's output that says why: its last line, or under torchrun the last line before the
    launcher's own traceback (which only says that a worker failed)."""
    lines = output.splitlines()
    failed = [i for i, line in enumerate(lines) if "ChildFailedError" in line]
    if failed:
        starts = [i for i in range(failed[0]) if lines[i].startswith("Traceback (most recent call last)")]
        lines = lines[:starts[-1]] if starts else lines[:failed[0]]
    # without torch's own log lines (glog style: "W1126 01:50:35.9 ...", "[W1126 ...]")
    lines = [line for line in lines if line.strip() and not re.match(r"\[?[IWE]\d{4} ", line)]
    return lines[-1].strip() if lines else "(no output)"


def run_process(command: list[str], log: Path, timeout: float, env: dict | None = None) -> str | None:
    """Runs `command` with its output in `log`; None if it succeeded, else the reason and the output's end. A run
    past `timeout` seconds is killed with all its processes (torchrun's workers share its session)."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print("$", " ".join(command), flush=True)
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return f"timed out after {timeout:.0f} s\n" + log.read_text()[-3000:]
    if process.returncode != 0:
        output = log.read_text()
        return f"exit status {process.returncode}: {error_line(output)}\n" + output[-3000:]
    return None


STARTED = time.perf_counter()


def run_timeout(args: argparse.Namespace) -> float:
    """--run-timeout, cut so that a hanging run cannot take the whole command much past --time-budget."""
    if args.time_budget <= 0:
        return args.run_timeout
    return min(args.run_timeout, max(60.0, args.time_budget + 30 - (time.perf_counter() - STARTED)))


def count_blocks(model: str) -> int:
    """The number of blocks of a preset or saved model: FSDP should make one unit of each, plus the root."""
    from transformers import AutoConfig

    import ssm_hf

    config = ssm_hf.preset_config(model) if model in ssm_hf.list_presets() else AutoConfig.from_pretrained(model)
    return config.num_hidden_layers


def run_training(model: str, mode: str, dtype: str, args: argparse.Namespace, out: Path) -> dict:
    """One finetune.py run; its per-step losses and summary, or its error."""
    name = f"{dtype}-{model}-{mode}"
    jsonl = out / "logs" / f"{name}.jsonl"
    command = [sys.executable] + (TORCHRUN if mode != "single" else []) + [
        str(FINETUNE), "--model", model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--text-chars", str(args.text_chars),
        "--log-file", str(jsonl), "--output-dir", str(out / "logs" / "trainer"),
    ]
    command += (["--bf16"] if dtype == "bf16" else []) + (["--fsdp"] if mode == "fsdp" else []) + \
        (["--activation-checkpointing"] if args.activation_checkpointing else []) + (["--cpu"] if args.cpu else [])
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if mode == "single" and not args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    start = time.perf_counter()
    error = run_process(command, out / "logs" / f"{name}.txt", run_timeout(args), env)
    result = {"model": model, "mode": mode, "dtype": dtype, "wall_s": round(time.perf_counter() - start, 1)}
    if mode == "fsdp":
        result["expected_fsdp_units"] = count_blocks(model) + 1
    if error is not None:
        return result | {"error": error}
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return result | {"losses": [r["loss"] for r in records if "loss" in r],
                     "summary": next(r for r in records if r.get("summary"))}


def compare(runs: list[dict], compare_steps: int) -> None:
    """Adds to each run its speed-up and its largest loss difference against the single run of its model/dtype."""
    singles = {(r["model"], r["dtype"]): r for r in runs if r["mode"] == "single" and "losses" in r}
    for run in runs:
        single = singles.get((run["model"], run["dtype"]))
        if "losses" not in run or single is None:
            continue
        pairs = list(zip(run["losses"][:compare_steps], single["losses"][:compare_steps]))
        run["loss_differences"] = [a - b for a, b in pairs]  # step by step: the first is before any update
        run["max_abs_loss_difference"] = max(abs(a - b) for a, b in pairs) if pairs else None
        mine, theirs = run["summary"]["tokens_per_s"], single["summary"]["tokens_per_s"]
        run["speedup"] = mine / theirs if mine and theirs else None


def format_table(runs: list[dict], compare_steps: int) -> str:
    header = (f"{'dtype':5} {'model':16} {'mode':6} {'tokens/s':>9} {'x single':>8} {'peak GiB per GPU':>17} "
              f"{'FSDP units':>10} {f'max |loss - single|, {compare_steps} steps':>32}  wall s")
    lines = [header, "-" * len(header)]
    for run in runs:
        start = f"{run['dtype']:5} {run['model']:16} {run['mode']:6}"
        if "skipped" in run:
            lines.append(f"{start} SKIPPED: {run['skipped']}")
            continue
        if "error" in run:
            lines.append(f"{start} FAILED: {run['error'].splitlines()[0]} (OUT/logs/{run['dtype']}-{run['model']}-"
                         f"{run['mode']}.txt)")
            continue
        summary = run["summary"]
        peaks = ", ".join(f"{p:.1f}" for p in summary["peak_memory_gib_per_process"] if p is not None) or "-"
        units = f"{summary['fsdp_units']} of {run['expected_fsdp_units']}" if run["mode"] == "fsdp" else ""
        diff = run.get("max_abs_loss_difference")
        speedup = run.get("speedup")
        lines.append(f"{start} {summary['tokens_per_s'] or float('nan'):9,.0f} "
                     f"{f'{speedup:.2f}x' if speedup else '-':>8} {peaks:>17} {units:>10} "
                     f"{f'{diff:.3g}' if diff is not None else '-':>32}  {run['wall_s']:.0f}")
    return "\n".join(lines)


def device_map_check(model_name: str, tokens: int = 32) -> dict:
    """Greedy generation of a random-weight preset split over 2 GPUs by device_map='auto' against one GPU, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    import ssm_hf

    torch.manual_seed(0)
    config = ssm_hf.preset_config(model_name, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        single = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to("cuda:0").eval()
        # cap GPU 0 below the model's size so that the blocks really spread over both
        size = sum(p.numel() * p.element_size() for p in single.parameters())
        cap = f"{int(size * 0.6 / 2**20)}MiB"
        split = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="auto",
                                                     max_memory={0: cap, 1: "60GiB"}).eval()
    prompt = torch.randint(1, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=tokens, do_sample=False, use_cache=True)
    expected = single.generate(prompt.to("cuda:0"), **settings).cpu()
    got = split.generate(prompt.to("cuda:0"), **settings).cpu()
    placement = split.hf_device_map
    blocks = {str(device) for name, device in placement.items() if ".layers." in name}
    return {"model": model_name, "devices": sorted({str(d) for d in placement.values()}),
            "blocks_on_devices": sorted(blocks), "greedy_tokens_equal": bool(torch.equal(got, expected)),
            "tokens_differing": int((got != expected).sum())}


def run_device_map(model: str, args: argparse.Namespace, out: Path) -> dict:
    """device_map_check in a subprocess of its own (a CUDA error there cannot poison the next check)."""
    result_file = out / "logs" / f"device_map-{model}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--device-map-worker", model,
               "--out", str(out)]
    error = run_process(command, out / "logs" / f"device_map-{model}.txt", run_timeout(args))
    if error is not None:
        return {"model": model, "error": error}
    return json.loads(result_file.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="zoo presets (or saved model folders)")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"],
                        help="bf16: mixed precision (float32 weights); fp32: float32 throughout")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (rows per step, all GPUs)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    parser.add_argument("--text-chars", type=int, default=400_000)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compare-steps", type=int, default=5, help="first steps whose losses are compared")
    parser.add_argument("--run-timeout", type=float, default=240, help="seconds before a run is killed")
    parser.add_argument("--time-budget", type=float, default=540,
                        help="seconds for everything: a run that would end past it (judged by the longest run so "
                             "far) is skipped and listed as such; 0 for no limit")
    parser.add_argument("--skip-device-map", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="train on CPU with gloo (a smoke test of this script)")
    parser.add_argument("--out", default=os.environ.get("OUT", "multi_gpu-out"))
    parser.add_argument("--device-map-worker", metavar="MODEL", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this repository's ssm_hf, also without PYTHONPATH=.
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if args.device_map_worker:
        result = device_map_check(args.device_map_worker)
        (out / "logs" / f"device_map-{args.device_map_worker}.json").write_text(json.dumps(result))
        return 0

    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2 and not args.cpu:
        print(f"bench/multi_gpu.py needs 2 GPUs (or --cpu); this machine has {gpus}: skipped.")
        return 0
    results = {"device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus,
               "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "args": vars(args), "training": [], "device_map": []}
    path = out / "multi_gpu.json"

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    longest = {"training": 0.0, "device_map": 0.0}

    def fits(kind: str) -> bool:
        """Whether a run of `kind` as long as the longest so far still ends within --time-budget."""
        return args.time_budget <= 0 or time.perf_counter() - STARTED + longest[kind] <= args.time_budget

    for dtype in args.dtype:
        for model in args.models:
            for mode in args.modes:
                if not fits("training"):
                    results["training"].append({"model": model, "mode": mode, "dtype": dtype,
                                                "skipped": f"--time-budget {args.time_budget:.0f} s"})
                    continue
                results["training"].append(run_training(model, mode, dtype, args, out))
                longest["training"] = max(longest["training"], results["training"][-1]["wall_s"])
                compare(results["training"], args.compare_steps)
                save()
                print(format_table(results["training"][-1:], args.compare_steps).splitlines()[-1], flush=True)
    if not args.skip_device_map and not args.cpu:
        for model in args.models:
            if not fits("device_map"):
                results["device_map"].append({"model": model, "skipped": f"--time-budget {args.time_budget:.0f} s"})
                continue
            began = time.perf_counter()
            results["device_map"].append(run_device_map(model, args, out))
            longest["device_map"] = max(longest["device_map"], time.perf_counter() - began)
            save()
    save()

    print(f"\nglobal batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, AdamW lr {args.lr}"
          + (", activation checkpointing" if args.activation_checkpointing else "") + f", {results['device']}")
    print(format_table(results["training"], args.compare_steps))
    for check in results["device_map"]:
        if "skipped" in check:
            print(f"device_map='auto' {check['model']}: SKIPPED: {check['skipped']}")
        elif "error" in check:
            print(f"device_map='auto' {check['model']}: FAILED: {check['error'].splitlines()[0]}")
        else:
            print(f"device_map='auto' {check['model']}: blocks on {', '.join(check['blocks_on_devices'])}, greedy "
                  f"tokens equal to one GPU's: {check['greedy_tokens_equal']} ({check['tokens_differing']} differ)")
    print(f"wrote {path}")
    failed = [r for r in results["training"] + results["device_map"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
