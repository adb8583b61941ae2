"""One optimizer step (then one more) of tiny models of every family through transformers' Trainer, under plain
`python` or `torchrun` (gloo on CPU); tests/test_distributed.py compares the runs.

    python tests/distributed_worker.py --out DIR [--grad-accum 1 2] [--cases mamba mamba2 s4 hybrid hybrid-repeated]
    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py --out DIR [--fsdp]

With `--fsdp` the model is sharded with FSDP2 and trained by a loop that scales the loss as Trainer does (Trainer
cannot shard on CPU: accelerate enables FSDP only on accelerators and falls back to DDP).

Every case trains on a fixed global batch of 4 rows of 32 random tokens per step (some rows have their last labels
set to -100, so micro-batches count different numbers of tokens), in order (sequential sampler), with SGD and no
gradient clipping. The Trainer gives process r micro-batches of rows [2r, 2r + 1] of each step, and one process
with `--grad-accum 2` sees the same two micro-batches one after the other. For each case and set-up the main
process writes `{case}-{tag}.json` (the logged loss of each step, the rows each process saw, the FSDP units) and
`{case}-{tag}.safetensors` (the gradients of the first step, after the data-parallel reduction), tag =
`ws{processes}-ga{accumulation}[-fsdp]`.

`hybrid-repeated` repeats each step's first half in its second half (rows a, b, a, b), so that each process's
half has the same router statistics as the whole batch: its load-balancing loss is then the same however the
batch is split, and the runs must agree exactly with one process without accumulation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import ssm_hf

SEQ_LEN = 32
GLOBAL_BATCH = 4
STEPS = 2
# case -> (zoo preset, config overrides); the hybrid has Mamba, attention and MoE layers, and a large
# load-balancing coefficient so that a wrong weighting of that term shows in the gradients
CASES = {
    "mamba": ("mamba-tiny", {}),
    "mamba2": ("mamba2-tiny", {}),
    "s4": ("s4-tiny", {}),
    "s4d": ("s4d-tiny", {}),
    "hybrid": ("hybrid-tiny", {"router_aux_loss_coef": 0.5}),
    "hybrid-repeated": ("hybrid-tiny", {"router_aux_loss_coef": 0.5}),
}


def make_rows(case: str, vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """STEPS x GLOBAL_BATCH rows of fresh random ids; labels = ids with the tail of some rows ignored (-100)."""
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    ids = torch.randint(1, vocab_size, (STEPS * GLOBAL_BATCH, SEQ_LEN), generator=generator)
    if case.endswith("-repeated"):
        half = GLOBAL_BATCH // 2
        ids = ids.view(STEPS, GLOBAL_BATCH, SEQ_LEN)
        ids[:, half:] = ids[:, :half]
        ids = ids.reshape(STEPS * GLOBAL_BATCH, SEQ_LEN)
    labels = ids.clone()
    for row, ignored in ((1, 9), (2, 20), (5, 3), (7, 14)):
        labels[row, -ignored:] = -100
        if case.endswith("-repeated"):  # keep the two halves of a step identical
            labels[row ^ (GLOBAL_BATCH // 2), -ignored:] = -100
    return [{"input_ids": i, "labels": label} for i, label in zip(ids, labels)]


class Record(TrainerCallback):
    """Keeps the logged losses and the first step's (reduced) gradients."""

    def __init__(self):
        self.losses: list[float] = []
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            for name, param in model.named_parameters():
                grad = param.grad
                if hasattr(grad, "full_tensor"):  # FSDP2: a DTensor shard; gathering is collective
                    grad = grad.full_tensor()
                self.gradients[name] = grad.detach().clone().contiguous()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


class SeenRowsTrainer(Trainer):
    """Remembers the first token of every row this process trains on (to check how the batch was split)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"][:, 0].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


def build_model(case: str) -> torch.nn.Module:
    """The case's tiny model, the same weights in every process."""
    preset, overrides = CASES[case]
    torch.manual_seed(0)
    config = ssm_hf.preset_config(preset, pad_token_id=0, bos_token_id=None, eos_token_id=None, **overrides)
    return AutoModelForCausalLM.from_config(config)


def write_results(out: Path, case: str, tag: str, losses: list[float], seen: list, gradients: dict,
                  model: torch.nn.Module) -> None:
    fsdp_units = sum(isinstance(module, FSDPModule) for module in model.modules())
    (out / f"{case}-{tag}.json").write_text(json.dumps({"losses": losses, "seen": seen, "fsdp_units": fsdp_units,
                                                        "blocks": len(model.base_model.layers)}))
    save_file(gradients, str(out / f"{case}-{tag}.safetensors"))


def run_case(case: str, grad_accum: int, out: Path) -> None:
    """Trainer, on one process or under DDP (torchrun)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model(case)
    config = model.config
    tag = f"ws{processes}-ga{grad_accum}"
    training = TrainingArguments(
        output_dir=str(out / f"trainer-{tag}"), per_device_train_batch_size=GLOBAL_BATCH // (processes * grad_accum),
        gradient_accumulation_steps=grad_accum, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, max_steps=STEPS, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        train_sampling_strategy="sequential", use_cpu=True, dataloader_drop_last=True,
        ddp_find_unused_parameters=False, disable_tqdm=True,
    )
    record = Record()
    trainer = SeenRowsTrainer(model=model, args=training, train_dataset=make_rows(case, config.vocab_size),
                              callbacks=[record])
    trainer.seen = []
    trainer.train()
    seen = [trainer.seen]
    if processes > 1:
        seen = [None] * processes
        torch.distributed.all_gather_object(seen, trainer.seen)
    if trainer.is_world_process_zero():
        write_results(out, case, tag, record.losses, seen, record.gradients, model)
    del trainer, model
    gc.collect()


def run_case_fsdp(case: str, out: Path) -> None:
    """FSDP2 (`fully_shard` on every block named by `_no_split_modules`, then the root) with gloo, in a loop that
    does what Trainer does under DDP / FSDP: each process's loss over its rows, normalised by the step's labelled
    tokens over all processes (`num_items_in_batch`) and multiplied by the number of processes, gradients averaged
    by FSDP's reduce-scatter. (Trainer itself cannot run FSDP on CPU: accelerate 1.15 enables FSDP only for
    accelerators and otherwise trains with DDP.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, processes = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = build_model(case).train()
    mesh = init_device_mesh("cpu", (processes,))
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = make_rows(case, model.config.vocab_size)
    per_process = GLOBAL_BATCH // processes
    losses, seen, gradients = [], [], {}
    for step in range(STEPS):
        step_rows = rows[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        mine = step_rows[rank * per_process:(rank + 1) * per_process]
        batch = {key: torch.stack([row[key] for row in mine]) for key in mine[0]}
        num_items = sum(int(row["labels"][1:].ne(-100).sum()) for row in step_rows)
        seen.append(batch["input_ids"][:, 0].tolist())
        loss = model(**batch, num_items_in_batch=torch.tensor(num_items)).loss * processes
        loss.backward()
        logged = loss.detach().clone()
        torch.distributed.all_reduce(logged)
        losses.append(logged.item() / processes)  # Trainer logs the mean over processes
        if step == 0:
            gradients = {name: param.grad.full_tensor().detach().clone().contiguous()
                         for name, param in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    all_seen = [None] * processes
    torch.distributed.all_gather_object(all_seen, seen)
    if rank == 0:
        write_results(out, case, f"ws{processes}-ga1-fsdp", losses, all_seen, gradients, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--grad-accum", nargs="+", type=int, default=[1])
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 in a loop of our own instead of Trainer")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.fsdp:
        torch.distributed.init_process_group("gloo")
    for case in args.cases:
        for grad_accum in args.grad_accum:
            if args.fsdp:
                run_case_fsdp(case, out)
            else:
                run_case(case, grad_accum, out)
    # tear down in order (see examples/finetune.py): gloo can deadlock if the interpreter's exit does it
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
