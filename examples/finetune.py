"""Fine-tune (or train from a zoo preset) a causal LM with transformers' Trainer, on one device or many.

    python examples/finetune.py --model mamba-tiny --steps 50
    torchrun --nproc_per_node 2 examples/finetune.py --model mamba-130m --bf16 --steps 50
    accelerate launch --num_processes 2 examples/finetune.py --model mamba-130m --bf16 --fsdp

`--batch-size` is the GLOBAL batch (rows per optimizer step, all processes together): the same command under
`python`, `torchrun` or `accelerate launch` trains on the same rows in the same order, so the per-step losses of
runs on 1 and N devices can be compared (`--log-file` writes them as JSON lines). `--model` is a zoo preset
(`ssm-hf zoo`), built with random weights, or a local folder saved by `save_pretrained`. Everything is offline:
the text is the Python standard library's source; a BPE tokenizer is trained on it unless the model folder
has its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import ssm_hf
from ssm_hf.data import causal_lm_blocks, python_stdlib_text, train_bpe_tokenizer


def world_size() -> int:
    """Processes in this run, as set by torchrun / accelerate launch (1 under plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class JsonLinesLog(TrainerCallback):
    """Writes one JSON line per logged step (loss, grad norm, lr, seconds since the start) and, at the end, a
    summary with tokens/s and every process's peak accelerator memory. Only the main process writes."""

    def __init__(self, path: str, tokens_per_step: int):
        self.path = Path(path)
        self.tokens_per_step = tokens_per_step
        self.start = None
        self.steps_timed = 0
        self.timed_since = None

    def _write(self, state, record: dict) -> None:
        if state.is_world_process_zero:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # throughput over the steps after the first (which includes compilation and autotuning)
        if state.global_step == 1:
            synchronize()
            self.timed_since = time.perf_counter()
        elif self.timed_since is not None:
            self.steps_timed += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._write(state, {"step": state.global_step, "loss": logs["loss"],
                                "grad_norm": logs.get("grad_norm"), "learning_rate": logs.get("learning_rate"),
                                "seconds": time.perf_counter() - self.start})

    def on_train_end(self, args, state, control, **kwargs):
        synchronize()
        elapsed = time.perf_counter() - self.timed_since if self.timed_since else None
        peaks = all_processes(peak_memory_gib())
        model = kwargs.get("model")
        fsdp_units = sum(isinstance(m, FSDPModule) for m in model.modules()) if model is not None else None
        self._write(state, {
            "summary": True, "steps": state.global_step, "world_size": world_size(),
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step * self.steps_timed / elapsed if elapsed and self.steps_timed else None,
            "peak_memory_gib_per_process": peaks, "fsdp_units": fsdp_units,
        })


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def all_processes(value):
    """`value` from every process (a list in rank order); `[value]` without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, value)
        return gathered
    return [value]


def load_model_and_tokenizer(name: str, text: str, vocab_size: int, dtype: torch.dtype):
    """A zoo preset (random weights, vocabulary sized to a BPE tokenizer trained on `text`) or a saved folder."""
    folder = Path(name)
    if folder.is_dir():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        if (folder / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            tokenizer = train_bpe_tokenizer(text, vocab_size=min(vocab_size, model.config.vocab_size))
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                             f"({model.config.vocab_size})")
        return model, tokenizer
    if name not in ssm_hf.list_presets():
        raise SystemExit(f"--model {name!r} is neither a local folder nor a zoo preset (see `ssm-hf zoo`)")
    tokenizer = train_bpe_tokenizer(text, vocab_size=vocab_size)
    config = ssm_hf.preset_config(name, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=dtype), tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba-tiny", help="zoo preset name or local model folder")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch: rows per step, all processes")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim (e.g. adamw_torch, sgd)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (float32 weights)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward pass (gradient checkpointing)")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard with FSDP2, one unit per block (`_no_split_modules`); or configure FSDP "
                             "through `accelerate config` instead")
    parser.add_argument("--text-chars", type=int, default=400_000, help="characters of training text")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary for presets")
    parser.add_argument("--output-dir", default="finetune-out")
    parser.add_argument("--save", action="store_true", help="save the final model and tokenizer to --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-file", default=None, help="JSON lines: one per step, then a summary")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    processes = world_size()
    if args.batch_size % (processes * args.grad_accum):
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by processes ({processes}) x "
                         f"--grad-accum ({args.grad_accum})")
    per_device = args.batch_size // (processes * args.grad_accum)
    if args.fsdp and (args.cpu or not torch.accelerator.is_available()):
        # accelerate enables FSDP only on accelerators: on CPU, Trainer would quietly train with plain DDP
        raise SystemExit("--fsdp needs GPUs (or another accelerator): accelerate does not shard on CPU and would "
                         "train with plain DDP; drop --fsdp (DDP) or run on GPUs")
    torch.manual_seed(args.seed)

    text = python_stdlib_text(args.text_chars)
    model, tokenizer = load_model_and_tokenizer(args.model, text, args.vocab_size, torch.float32)
    blocks = causal_lm_blocks(tokenizer, text, args.seq_len)
    if len(blocks) < args.batch_size:
        raise SystemExit(f"{len(blocks)} blocks of {args.seq_len} tokens is fewer than one batch; raise --text-chars")

    fsdp = {}
    if args.fsdp:
        # FSDP2, one unit per block; the final save gathers a full state dict on the main process
        fsdp = dict(fsdp=True, fsdp_config={
            "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
            "transformer_layer_cls_to_wrap": list(model._no_split_modules), "state_dict_type": "FULL_STATE_DICT",
            # FSDP's own checkpointing: the TrainingArguments flag would add an all-gather in the backward pass
            "activation_checkpointing": args.activation_checkpointing})
    training = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        lr_scheduler_type="constant_with_warmup" if args.warmup_steps else "constant", optim=args.optim,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
        bf16=args.bf16, activation_checkpointing=args.activation_checkpointing and not args.fsdp, use_cpu=args.cpu,
        dataloader_drop_last=True, ddp_find_unused_parameters=False, **fsdp,
    )
    callbacks = [JsonLinesLog(args.log_file, args.batch_size * args.seq_len)] if args.log_file else []
    trainer = Trainer(model=model, args=training, train_dataset=blocks, callbacks=callbacks)
    if trainer.is_world_process_zero():
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {processes} "
              f"process(es) x {per_device} rows x {args.grad_accum} accumulation = {args.batch_size} rows of "
              f"{args.seq_len} tokens per step, {len(blocks)} rows in all")
    result = trainer.train()
    if trainer.is_world_process_zero():
        print(f"final training loss {result.training_loss:.4f} over {result.global_step} steps")
    if args.save:
        trainer.save_model(args.output_dir)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(args.output_dir)
    # Tear down in order: first the DDP wrapper (its reducer holds the process group), then the group itself.
    # Leaving both to the interpreter's exit can deadlock gloo (its destructor joins a worker thread that waits
    # for the GIL to free a finished all-gather's tensors).
    del trainer, model
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
