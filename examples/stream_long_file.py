"""Prompt caching with an SSM: read a long file once, in chunks, keep its state, answer several prompts from it.

    python examples/stream_long_file.py [--file PATH] [--chars 100000] [--chunk 1024] [--train-seconds 10]

The file (by default Python standard-library source) streams through a small Mamba in chunks while only the
fixed-size state is kept; the state is snapshotted, saved, loaded back, and each prompt is answered by
`generate()` from a fresh copy of it, at a cost that does not depend on the file's length. For comparison, one
prompt is also answered by re-reading the whole file. Everything is offline: the tokenizer is trained here, and the
model gets a few seconds of training on the file (`--train-seconds 0` keeps it random); it is tiny and barely
trained, so its answers are not the point: the mechanics and the timings are.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import ssm_hf
from ssm_hf.data import python_stdlib_text, train_bpe_tokenizer

PROMPTS = ["\ndef ", "\nclass ", "\n    # "]


def quick_training(model, ids: torch.Tensor, seconds: float, block: int = 128, batch: int = 16) -> int:
    """AdamW on random windows of `ids` for about `seconds`; returns the number of steps."""
    if seconds <= 0 or len(ids) <= block + 1:
        return 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    steps, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        starts = torch.randint(0, len(ids) - block, (batch,), generator=generator)
        windows = torch.stack([ids[s:s + block] for s in starts.tolist()])
        model(windows, labels=windows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    model.eval()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", help="text file to read (default: Python standard-library source)")
    parser.add_argument("--chars", type=int, default=100_000, help="characters of the file to read")
    parser.add_argument("--preset", default="mamba-tiny", help="zoo preset (see `ssm-hf zoo`)")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per streamed chunk")
    parser.add_argument("--train-seconds", type=float, default=10.0, help="quick training before streaming")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens generated per prompt")
    parser.add_argument("--output", help="where to save the snapshot (default: a temporary file)")
    args = parser.parse_args()
    torch.manual_seed(0)

    text = (Path(args.file).read_text(encoding="utf-8", errors="replace") if args.file
            else python_stdlib_text(args.chars))[:args.chars]
    tokenizer = train_bpe_tokenizer(text, vocab_size=1024)
    file_ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    config = ssm_hf.preset_config(args.preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config)
    steps = quick_training(model, file_ids, args.train_seconds)
    model.eval()
    print(f"{args.preset}: {len(text):,} characters = {len(file_ids):,} tokens; {steps} training steps")

    # 1. read the file once, chunk by chunk, keeping only the state
    cache = ssm_hf.StateCache(config=model.config)
    start = time.perf_counter()
    for _ in ssm_hf.stream(model, file_ids.split(args.chunk), cache, logits_to_keep=1):
        pass
    read_s = time.perf_counter() - start
    print(f"streamed in chunks of {args.chunk}: {read_s:.2f} s ({len(file_ids) / read_s:,.0f} tokens/s), "
          f"state {cache.nbytes / 1024:.1f} KiB")

    # 2. snapshot it, save it, load it back (checked against the model's architecture and dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.output or Path(tmp) / "file.state")
        ssm_hf.snapshot(cache).save(path)
        snapshot = ssm_hf.load_snapshot(path, model)
        print(f"snapshot saved to {path} ({path.stat().st_size / 1024:.1f} KiB): {snapshot}")

    # 3. answer several prompts from fresh copies of the snapshot: input_ids hold the whole sequence, the cached
    # part is sliced off by generate(), so only the prompt is read
    answers = {}
    for prompt in PROMPTS:
        prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
        ids = torch.cat([file_ids, prompt_ids])[None]
        start = time.perf_counter()
        out = model.generate(ids, cache=snapshot.to_cache(), max_new_tokens=args.new_tokens,
                             do_sample=False)
        answers[prompt] = (ids, out, time.perf_counter() - start)
        print(f"--- {prompt!r} from the snapshot ({answers[prompt][2]:.2f} s):\n"
              f"{prompt + tokenizer.decode(out[0, ids.shape[1]:])}")

    # 4. the same first prompt by re-reading the whole file
    ids, from_snapshot, snapshot_s = answers[PROMPTS[0]]
    start = time.perf_counter()
    reread = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    reread_s = time.perf_counter() - start
    print(f"re-reading the file for {PROMPTS[0]!r}: {reread_s:.2f} s, from the snapshot {snapshot_s:.2f} s; "
          f"same tokens as re-reading the file: {torch.equal(reread, from_snapshot)}")

    # 5. fork the snapshot into a batch: three sampled continuations of one prompt, the file read zero more times
    torch.manual_seed(1)
    samples = model.generate(ids.repeat(3, 1), cache=snapshot.fork(3).to_cache(),
                             max_new_tokens=args.new_tokens, do_sample=True, top_k=20)
    for row in samples:
        print(f"--- sample: {PROMPTS[0] + tokenizer.decode(row[ids.shape[1]:])!r}")


if __name__ == "__main__":
    main()
