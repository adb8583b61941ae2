"""Data-parallel training on CPU: `examples/finetune.py` under torchrun with 2 gloo processes against one process
with the same global batch. Multi-GPU DDP/FSDP runs are `bench/multi_gpu.py` (needs 2 GPUs)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "finetune.py"

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


@pytest.mark.parametrize("model", ["mamba-tiny"])
def test_ddp_two_processes_match_one(tmp_path, model):
    # the repository's ssm_hf (not an installed one), one thread per process: the two runs share a small CPU
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # DDP also with activation checkpointing, which must not change the numbers
    runs = []
    for out, processes, extra in ((single, 1, ()), (ddp, 2, ("--activation-checkpointing",))):
        out.mkdir()
        # output to a file, not a pipe: a full pipe would block a process that another one waits for
        with open(out / "output.txt", "w") as log:
            runs.append((out, subprocess.Popen(finetune_command(model, out, processes, *extra), env=env, cwd=ROOT,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)))
    for out, run in runs:
        try:
            run.wait(timeout=120)
        finally:
            if run.poll() is None:  # the launcher and its workers, which share its session
                os.killpg(run.pid, signal.SIGKILL)
        assert run.returncode == 0, (out / "output.txt").read_text()[-3000:]

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
