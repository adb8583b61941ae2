"""Data-parallel training on CPU with gloo: `examples/finetune.py` under torchrun with 2 processes against one
process with the same global batch, and `tests/distributed_worker.py` (Trainer, one step of a tiny model of every
family) under DDP and FSDP2 against one process, with and without gradient accumulation; the hybrid's MoE
load-balancing loss must count once per optimizer step in all of them. Multi-GPU DDP/FSDP runs are
`bench/multi_gpu.py` (needs 2 GPUs)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale
from distributed_worker import make_rows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ssm_hf

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "finetune.py"
WORKER = ROOT / "tests" / "distributed_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def finetune_command(model: str, out: Path, processes: int, *extra: str) -> list[str]:
    launcher = [sys.executable]
    if processes > 1:
        # --standalone: a local rendezvous on a free port
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return launcher + [
        str(SCRIPT), "--model", model, "--steps", "3", "--batch-size", "4", "--seq-len", "32",
        "--text-chars", "20000", "--vocab-size", "300", "--optim", "sgd", "--lr", "0.1", "--cpu", "--save",
        "--output-dir", str(out), "--log-file", str(out / "log.jsonl"), *extra,
    ]


def read_log(out: Path) -> tuple[list[float], dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], next(r for r in records if r.get("summary"))


def run_all(commands: dict[Path, list[str]], timeout: float = 180) -> None:
    """Run the commands at once, each writing its output to OUT/output.txt; fail with the output of any that fails."""
    # the repository's ssm_hf (not an installed one), one thread per process: the runs share a small CPU
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    runs = []
    for out, command in commands.items():
        out.mkdir(parents=True, exist_ok=True)
        # output to a file, not a pipe: a full pipe would block a process that another one waits for
        with open(out / "output.txt", "w") as log:
            runs.append((out, subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)))
    for out, run in runs:
        try:
            run.wait(timeout=timeout)
        finally:
            if run.poll() is None:  # the launcher and its workers, which share its session
                os.killpg(run.pid, signal.SIGKILL)
        assert run.returncode == 0, (out / "output.txt").read_text()[-3000:]


@pytest.mark.parametrize("model", ["mamba-tiny"])
def test_ddp_two_processes_match_one(tmp_path, model):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # DDP also with activation checkpointing, which must not change the numbers
    run_all({single: finetune_command(model, single, 1),
             ddp: finetune_command(model, ddp, 2, "--activation-checkpointing")})

    single_losses, single_summary = read_log(single)
    ddp_losses, ddp_summary = read_log(ddp)
    assert (single_summary["world_size"], ddp_summary["world_size"]) == (1, 2)
    assert len(single_losses) == len(ddp_losses) == 3
    assert_close_to_scale(torch.tensor(ddp_losses), torch.tensor(single_losses))
    assert single_losses[-1] != single_losses[0]  # the steps did update the model

    single_weights = load_file(single / "model.safetensors")
    ddp_weights = load_file(ddp / "model.safetensors")
    assert single_weights.keys() == ddp_weights.keys()
    for name, weight in single_weights.items():
        assert_close_to_scale(ddp_weights[name], weight)


# --- Trainer under DDP / FSDP2 for every family (tests/distributed_worker.py) ---

CASES = ["mamba", "mamba2", "s4", "hybrid", "hybrid-repeated"]
# the reference each case must match exactly: the hybrid's load-balancing loss is computed per micro-batch (as in
# Jamba / Mixtral), so on distinct rows 2 processes equal 1 process accumulating the same 2 micro-batches, not one
# forward over the 4 rows; with rows a, b, a, b ("hybrid-repeated") every split has the same router statistics,
# so every set-up must equal one forward over the whole batch
REFERENCE = {case: "ws1-ga1" for case in CASES} | {"hybrid": "ws1-ga2"}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> Path:
    """One process (with and without gradient accumulation), 2 DDP processes and 2 FSDP2 processes, all cases."""
    out = tmp_path_factory.mktemp("trainer_runs")
    worker = [str(WORKER), "--out", str(out), "--cases", *CASES]
    run_all({out / "single": [sys.executable, *worker, "--grad-accum", "1", "2"],
             out / "ddp": TORCHRUN + worker,
             out / "fsdp": TORCHRUN + worker + ["--fsdp"]})
    return out


def read_run(out: Path, case: str, tag: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / f"{case}-{tag}.json").read_text()), load_file(out / f"{case}-{tag}.safetensors")


@pytest.mark.parametrize("case,tag", [(case, tag) for case in CASES for tag in ("ws1-ga2", "ws2-ga1", "ws2-ga1-fsdp")
                                      if tag != REFERENCE[case]])
def test_trainer_data_parallel_matches_one_process(trainer_runs, case, tag):
    """Loss of both steps and the first step's gradients (after the data-parallel reduction) match the reference
    run on the same global batch, float32."""
    expected, expected_grads = read_run(trainer_runs, case, REFERENCE[case])
    got, grads = read_run(trainer_runs, case, tag)
    # the split the comparison relies on: step s = rows 4s..4s+3 in order, process r (or micro-batch r) 2 of them
    rows = [row for step in zip(*expected["seen"]) for batch in step for row in batch]
    if tag.startswith("ws2"):
        assert [row for step in zip(*got["seen"]) for batch in step for row in batch] == rows
        assert all(len(batch) == 2 for process in got["seen"] for batch in process)
    if tag.endswith("fsdp"):
        assert got["fsdp_units"] == got["blocks"] + 1  # one per block (`_no_split_modules`) and the root
    assert len(got["losses"]) == len(expected["losses"]) == 2
    assert_close_to_scale(torch.tensor(got["losses"]), torch.tensor(expected["losses"]))
    assert grads.keys() == expected_grads.keys()
    assert_close_to_scale(torch.cat([grads[k].flatten() for k in grads]),
                          torch.cat([expected_grads[k].flatten() for k in grads]))
    if case.startswith("hybrid"):  # the load-balancing loss reaches the routers
        assert all(grads[k].abs().max() > 0 for k in grads if "router" in k)


def test_trainer_hybrid_load_balancing_counts_once(trainer_runs):
    """The logged loss of the hybrid's first step is the LM loss plus router_aux_loss_coef x the load-balancing
    loss once, for every set-up: recomputed here from the same weights and rows in one plain forward."""
    torch.manual_seed(0)
    config = ssm_hf.preset_config("hybrid-tiny", pad_token_id=0, bos_token_id=None, eos_token_id=None,
                                  router_aux_loss_coef=0.5)
    model = AutoModelForCausalLM.from_config(config).train()
    rows = make_rows("hybrid-repeated", config.vocab_size)[:4]
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        out = model(**batch)  # a plain call: LM loss + 0.5 x aux_loss
    assert out.aux_loss > 1  # top-2 of 4 experts: 2 when balanced, so counting it twice would add about 1
    for tag in ("ws1-ga1", "ws1-ga2", "ws2-ga1", "ws2-ga1-fsdp"):
        first_loss = read_run(trainer_runs, "hybrid-repeated", tag)[0]["losses"][0]
        assert abs(first_loss - out.loss.item()) < 1e-5 * out.loss.item(), tag


def test_multi_gpu_bench_records_a_failed_run_and_goes_on(tmp_path):
    """bench/multi_gpu.py's bookkeeping, on CPU: every (model, mode) in its own subprocess, a failing one (FSDP,
    which needs GPUs) recorded with its reason while the others run, the JSON written, the table printed."""
    command = [sys.executable, str(ROOT / "bench" / "multi_gpu.py"), "--cpu", "--models", "mamba-tiny",
               "--modes", "fsdp", "single", "--dtype", "fp32", "--steps", "2", "--batch-size", "4", "--seq-len", "32",
               "--text-chars", "20000", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # a run failed
    fsdp, single = json.loads((tmp_path / "multi_gpu.json").read_text())["training"]
    assert (fsdp["mode"], single["mode"]) == ("fsdp", "single")
    assert "--fsdp needs GPUs" in fsdp["error"].splitlines()[0]
    assert "error" not in single and len(single["losses"]) == 2 and single["max_abs_loss_difference"] == 0
    assert single["summary"]["world_size"] == 1 and single["summary"]["tokens_per_s"] > 0
    table = done.stdout[done.stdout.index("dtype model"):]
    assert "fp32  mamba-tiny       fsdp   FAILED: exit status 1: --fsdp needs GPUs" in table
    assert "fp32  mamba-tiny       single" in table
