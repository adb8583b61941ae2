"""Quickstart: a small Mamba from the zoo, trained for about a minute on CPU on offline text, then sampled.

    python examples/quickstart.py [--seconds 60] [--output-dir quickstart-out]

Everything is local: the text is the Python standard library's own source, the tokenizer is trained here.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, pipeline

import ssm_hf
from ssm_hf.data import causal_lm_blocks, python_stdlib_text, train_bpe_tokenizer


class StopAfter(TrainerCallback):
    """Ends training after a wall-clock budget, so the quickstart takes about the same time on any CPU."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mamba-mini", help="zoo preset to build (see `ssm-hf zoo`)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--output-dir", default="quickstart-out")
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)

    text = python_stdlib_text(400_000)
    split = int(len(text) * 0.95)
    tokenizer = train_bpe_tokenizer(text[:split], vocab_size=2048)
    train_blocks = causal_lm_blocks(tokenizer, text[:split], args.block_size)
    eval_blocks = causal_lm_blocks(tokenizer, text[split:], args.block_size)

    config = ssm_hf.preset_config(args.preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train_blocks)} training blocks of {args.block_size} tokens")

    training = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=20,
        lr_scheduler_type="cosine", max_steps=600, logging_steps=10, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, per_device_eval_batch_size=16,
    )
    trainer = Trainer(model=model, args=training, train_dataset=train_blocks, eval_dataset=eval_blocks,
                      callbacks=[StopAfter(args.seconds)])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss: {before:.3f} before training, {after:.3f} after")

    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    loaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    generator = pipeline("text-generation", model=loaded, tokenizer=tokenizer)
    sample = generator("def ", max_new_tokens=60, do_sample=True, top_k=20, temperature=0.8)
    print("sample:\n" + sample[0]["generated_text"])
    if not after < before:
        raise SystemExit(f"training did not lower the held-out loss ({before:.3f} -> {after:.3f})")


if __name__ == "__main__":
    main()
